"""Training crops of a partly revised label centre on its revised organs: the masked loss learns only
from those, so a crop without them teaches that label nothing. A label revised whole (or given without a
channel mask) is cropped exactly as before."""

from __future__ import annotations

import numpy as np
import pytest
from monai.transforms import Compose

from lib.classes import CLASS_INDEX
from lib.transforms.recipe import Recipe, training_transforms
from testing.phantoms import make_phantom, write_phantom

ORGANS = ["liver", "spleen", "stomach", "kidney_right", "kidney_left"]
RECIPE = Recipe(spacing=(3.0, 3.0, 4.0), roi=(16, 16, 16), overlap=0.0)
CLASSES = [CLASS_INDEX[o] for o in ORGANS]
DRAWS = 60  # crops of the sample


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    work = tmp_path_factory.mktemp("crops")
    write_phantom(make_phantom(5, shape=(64, 64, 40), spacing_mm=(3.0, 3.0, 4.0)), str(work), "ph")
    return {"image": str(work / "ph.nii.gz"), "label": str(work / "labels" / "final" / "ph.nii.gz")}


def _crops(files, mask, revised_key="revised"):
    """DRAWS crops' label channels (C, X, Y, Z) of one seeded pass over the sample."""
    chain = Compose(training_transforms(RECIPE, CLASSES, RECIPE.roi, num_samples=DRAWS, revised_key=revised_key))
    chain.set_random_state(7)
    crops = chain(dict(files, **({"revised": mask} if mask is not None else {})))
    assert len(crops) == DRAWS and all("crop_foreground" not in c for c in crops), "kept out of the batch"
    return [np.asarray(c["label"]) for c in crops]


def test_crops_of_a_partly_revised_label_hold_its_revised_organ(files):
    kidney = ORGANS.index("kidney_left")
    only_kidney = [1.0 if o == "kidney_left" else 0.0 for o in ORGANS]
    revised = np.mean([c[kidney].any() for c in _crops(files, only_kidney)])
    whole = np.mean([c[kidney].any() for c in _crops(files, [1.0] * len(ORGANS))])
    # Two of three crops centre on the foreground: with the mask, all of those hold the kidney.
    assert revised >= 0.6, revised
    assert revised >= whole + 0.2, (revised, whole)


def test_a_label_revised_whole_is_cropped_as_without_a_mask(files):
    with_mask = _crops(files, [1.0] * len(ORGANS))
    without = _crops(files, None, revised_key=None)
    assert all(np.array_equal(a, b) for a, b in zip(with_mask, without))
