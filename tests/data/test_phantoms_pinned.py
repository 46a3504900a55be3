"""The benchmark's phantoms stay as they are: bench/RESULTS.md compares strategies on them, so a change to
a site or a hard case (which could make one strategy win) must show up here. Changing them on purpose:
update the hashes and say in bench/RESULTS.md what changed and why, and re-run the benchmarks."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from testing.phantoms import HARD_CASES, SITES, make_phantom

# sha256 (first 16 hex digits) of image + label bytes of make_phantom(7) at 32x32x24, 3x each site's spacing.
PINNED = {
    ("A", None): "627aa2975c859bce",
    ("A", "missing_organ"): "4bcd83ec6b0211bc",
    ("A", "enlarged_organ"): "de97ddfcd90d654b",
    ("A", "touching"): "acd6611a05a44411",
    ("A", "low_contrast"): "f7141de217adcad7",
    ("A", "streaks"): "e1e2eaa4c462ef69",
    ("B", None): "2e1b7bcc0d28ae1b",
    ("B", "missing_organ"): "86ef1164091960dd",
    ("B", "enlarged_organ"): "8a79d1a2a5b5aada",
    ("B", "touching"): "4bdb60be9621bb3f",
    ("B", "low_contrast"): "17f2f0dba0ee9417",
    ("B", "streaks"): "850fa26e2d71d365",
    ("C", None): "c3edd201a98b283b",
    ("C", "missing_organ"): "3d4c429043ee10b6",
    ("C", "enlarged_organ"): "f2d20e48769d2501",
    ("C", "touching"): "61b0cf8652d0799a",
    ("C", "low_contrast"): "e8ca9eb899a33023",
    ("C", "streaks"): "e003840a3eff0de7",
    ("D", None): "b182c1615d203f2a",
    ("D", "missing_organ"): "197902577d54fde9",
    ("D", "enlarged_organ"): "588897f2fa114dd4",
    ("D", "touching"): "a14b8567293bd2d0",
    ("D", "low_contrast"): "f58db816e4e8603c",
    ("D", "streaks"): "6749ce2782acad43",
}


def test_every_site_and_hard_case_is_pinned():
    assert set(PINNED) == {(site, hard) for site in SITES for hard in (None, *HARD_CASES)}


@pytest.mark.parametrize("site, hard", sorted(PINNED, key=str))
def test_phantom_is_unchanged(site, hard):
    spacing = tuple(s * 3 for s in SITES[site].spacing_mm)
    ph = make_phantom(7, shape=(32, 32, 24), spacing_mm=spacing, site=site, hard=hard)
    digest = hashlib.sha256(np.ascontiguousarray(ph.image).tobytes() + np.ascontiguousarray(ph.label).tobytes())
    assert digest.hexdigest()[:16] == PINNED[(site, hard)], f"phantom of site {site}, hard case {hard} changed"
