"""The pure parts of organ-level revision: which organs an annotator changed, and what a save naming none
revised."""

from __future__ import annotations

import numpy as np
import pytest

from lib.classes import CLASS_INDEX
from lib.datastore.revisions import changed_organs, implied_revision

NAMES = ["spleen", "kidney_right", "liver", "stomach", "pancreas"]
CLASSES = {n: CLASS_INDEX[n] for n in NAMES}
SPLEEN, KIDNEY, LIVER, STOMACH, PANCREAS = (CLASS_INDEX[n] for n in NAMES)


def _served():
    lab = np.zeros((20, 16, 12), np.uint8)
    lab[2:8, 2:8, 2:6] = LIVER
    lab[10:14, 2:6, 2:6] = SPLEEN
    lab[2:6, 10:14, 6:10] = STOMACH
    lab[14:18, 10:14, 6:10] = KIDNEY
    return lab


def test_changed_organs_names_each_organ_drawn_erased_or_moved_by_one_voxel_and_no_other():
    served = _served()
    assert changed_organs(served.copy(), served, CLASSES) == []
    new = served.copy()
    new[3, 3, 3] = 0  # one liver voxel erased
    new[0, 0, 0] = PANCREAS  # an organ the model missed, drawn
    new[new == KIDNEY] = 0  # an organ deleted
    assert changed_organs(new, served, CLASSES) == ["kidney_right", "liver", "pancreas"]
    moved = served.copy()
    moved[10, 2, 2] = STOMACH  # a spleen voxel given to the stomach: both changed
    assert changed_organs(moved, served, CLASSES) == ["spleen", "stomach"]


def test_changed_organs_compares_values_not_dtypes_and_refuses_another_grid():
    served = _served()
    assert changed_organs(served.astype(np.int16), served, CLASSES) == []
    with pytest.raises(ValueError, match="shape"):
        changed_organs(served[:-1], served, CLASSES)


def test_a_save_naming_no_organs_counts_the_hand_out_and_the_changed_organs_else_the_whole_volume():
    assert implied_revision(["pancreas", "liver"], ["stomach", "liver"], NAMES) == ["liver", "stomach", "pancreas"]
    assert implied_revision(["pancreas"], None, NAMES) == ["pancreas"], "no pre-annotation: the hand-out alone"
    # No organ-level hand-out: a whole-volume revision as before, whatever changed.
    assert implied_revision(None, ["liver"], NAMES) is None
    assert implied_revision([], ["liver"], NAMES) is None
