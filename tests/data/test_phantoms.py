"""Synthetic CT phantoms: determinism, anatomy, HU, NIfTI files, hard cases, sample folders."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
from scipy import ndimage

nib = pytest.importorskip("nibabel")

from lib.classes import CLASS_INDEX, LABEL_SETS  # noqa: E402
from testing import phantoms  # noqa: E402
from testing.phantoms import (  # noqa: E402
    HARD_CASES,
    ORGAN_CASES,
    SITES,
    STRUCTURES,
    make_phantom,
    make_sample_studies,
    organ_hu,
    write_phantom,
)

SMALL = (48, 48, 40)  # for file-handling tests, where anatomy does not matter
THIN = {"celiac_trunk", "portal_vein_and_splenic_vein", "hepatic_vessel"}  # partial-volume dominated


@functools.lru_cache(maxsize=None)
def phantom(seed: int = 0, site: str = "A", hard=None):
    return make_phantom(seed, site=site, hard=hard)


def volumes(ph) -> np.ndarray:
    return np.bincount(ph.label.ravel(), minlength=26)


def world_centroid(ph, name: str) -> np.ndarray:
    ijk = np.argwhere(ph.label == CLASS_INDEX[name]).mean(0)
    return (ph.affine @ np.append(ijk, 1.0))[:3]


def body_centre(ph) -> np.ndarray:
    ijk = np.argwhere(ph.image > -500).mean(0)
    return (ph.affine @ np.append(ijk, 1.0))[:3]


def core_median(ph, name: str) -> float:
    """Median HU of the label eroded by one voxel (away from partial-volume edges) when enough is left."""
    i = CLASS_INDEX[name]
    sl = ndimage.find_objects(ph.label)[i - 1]
    m = ph.label[sl] == i
    core = ndimage.binary_erosion(m)
    return float(np.median(ph.image[sl][core if core.sum() >= 10 else m]))


def touching_faces(label: np.ndarray, a: str, b: str) -> int:
    A, B = label == CLASS_INDEX[a], label == CLASS_INDEX[b]
    n = 0
    for ax in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        n += int((A[tuple(lo)] & B[tuple(hi)]).sum() + (B[tuple(lo)] & A[tuple(hi)]).sum())
    return n


# ---------------------------------------------------------------------------------------------


def test_structure_list_is_atlas25():
    assert STRUCTURES == LABEL_SETS["atlas25"]
    assert [CLASS_INDEX[n] for n in STRUCTURES] == list(range(1, 26))


def test_deterministic_by_seed():
    a = make_phantom(3, site="B")
    b = make_phantom(3, site="B")
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.label, b.label)
    assert np.array_equal(a.affine, b.affine)
    assert a.meta == b.meta
    c = phantom(0, "B")
    assert not np.array_equal(a.image, c.image)
    assert (a.label != c.label).mean() > 0.01


def test_types_geometry_and_meta():
    ph = phantom(0, "A")
    assert ph.image.dtype == np.int16 and ph.label.dtype == np.uint8
    assert ph.image.shape == ph.label.shape == (128, 128, 96)
    assert ph.affine.shape == (4, 4)
    assert np.allclose(np.diag(ph.affine)[:3], SITES["A"].spacing_mm)
    assert nib.aff2axcodes(ph.affine) == ("R", "A", "S")
    assert np.all(np.abs(ph.affine[:3, 3]) < 1000)  # a scanner-like origin, mm
    assert ph.meta["seed"] == 0 and ph.meta["site"] == "A" and ph.meta["hard"] is None
    assert tuple(ph.meta["spacing_mm"]) == SITES["A"].spacing_mm
    assert ph.label.max() <= 25
    json.dumps(ph.meta)  # plain Python values, so it can go into a datastore or a report
    # Air outside the body, fat inside it.
    assert np.median(ph.image[:3, :3, :]) < -950
    assert (np.abs(ph.image[ph.image > -500] + 100) < 30).mean() > 0.05


def test_shape_and_spacing_arguments():
    ph = make_phantom(1, shape=(96, 80, 64), spacing_mm=(2.0, 2.0, 3.0), site=SITES["C"])
    assert ph.image.shape == (96, 80, 64)
    assert np.allclose(np.diag(ph.affine)[:3], (2.0, 2.0, 3.0))
    assert ph.meta["site"] == "C" and ph.meta["phase"] == "native"
    assert (volumes(ph)[1:] > 0).all()


@pytest.mark.parametrize("site", sorted(SITES))
def test_all_structures_visible(site):
    ph = phantom(1, site)
    vol = volumes(ph)
    small = {n: int(vol[CLASS_INDEX[n]]) for n in STRUCTURES if vol[CLASS_INDEX[n]] < 20}
    assert not small, f"structures (nearly) painted over: {small}"


@pytest.mark.parametrize("seed,site", [(0, "A"), (1, "B"), (2, "D")])
def test_relative_positions(seed, site):
    ph = phantom(seed, site)
    c = {n: world_centroid(ph, n) for n in STRUCTURES}
    mid = body_centre(ph)
    X, Y, Z = 0, 1, 2  # RAS+: +x patient's right, +y anterior, +z superior
    # Patient's right has the larger world x.
    assert c["liver"][X] > mid[X] > c["spleen"][X]
    assert c["stomach"][X] < mid[X]
    assert c["gall_bladder"][X] > mid[X]
    for right, left in (("kidney_right", "kidney_left"), ("adrenal_gland_right", "adrenal_gland_left"),
                        ("lung_right", "lung_left"), ("femur_right", "femur_left")):
        assert c[right][X] > mid[X] > c[left][X], (right, left)
    # Cranio-caudal order.
    for upper, lower in (("lung_right", "liver"), ("lung_left", "spleen"), ("liver", "kidney_right"),
                         ("adrenal_gland_right", "kidney_right"), ("adrenal_gland_left", "kidney_left"),
                         ("pancreas", "bladder"), ("intestine", "bladder"), ("bladder", "prostate"),
                         ("kidney_left", "femur_left"), ("esophagus", "pancreas"), ("celiac_trunk", "bladder")):
        assert c[upper][Z] > c[lower][Z], (upper, lower)
    # Front to back: vessels and kidneys behind the pancreas and bowel.
    for front, back in (("pancreas", "aorta"), ("pancreas", "kidney_left"), ("duodenum", "kidney_right"),
                        ("gall_bladder", "postcava"), ("bladder", "rectum"), ("intestine", "aorta")):
        assert c[front][Y] > c[back][Y], (front, back)
    # Hepatic vessels run inside the liver's extent.
    lo = np.argwhere(ph.label == CLASS_INDEX["liver"]).min(0)
    hi = np.argwhere(ph.label == CLASS_INDEX["liver"]).max(0)
    hv = np.argwhere(ph.label == CLASS_INDEX["hepatic_vessel"])
    assert ((hv >= lo) & (hv <= hi)).all()


@pytest.mark.parametrize("site", ["A", "B", "C"])
def test_hu_medians_match_design(site):
    ph = phantom(1, site)
    phase = SITES[site].phase
    assert ph.meta["phase"] == phase
    for n in STRUCTURES:
        painted = ph.meta["organ_hu"][n]
        assert abs(painted - organ_hu(n, phase)) <= 20, n  # small per-patient jitter only
        med = core_median(ph, n)
        if n.startswith("femur"):
            assert 300 <= med <= 1100, (n, med)  # marrow inside a cortex shell
        elif n in THIN:
            assert -100 + 0.5 * (painted + 100) <= med <= painted + 25, (n, med, painted)
        else:
            assert abs(med - painted) <= 35, (n, med, painted)


def test_hu_plausible_by_phase():
    portal, arterial, native = phantom(1, "A"), phantom(1, "B"), phantom(1, "C")
    m = core_median
    assert 80 <= m(portal, "liver") <= 130
    assert 120 <= m(portal, "kidney_right") <= 200
    assert m(portal, "portal_vein_and_splenic_vein") > m(portal, "liver")
    assert m(arterial, "aorta") > 220 and m(arterial, "aorta") > m(arterial, "postcava") + 100
    assert m(native, "aorta") < 70 and 40 <= m(native, "liver") <= 75
    for ph in (portal, arterial, native):
        assert m(ph, "lung_right") < -700 and m(ph, "lung_left") < -700
        assert -20 <= m(ph, "bladder") <= 35 and -20 <= m(ph, "gall_bladder") <= 35
        assert m(ph, "femur_left") > 300


def test_nifti_round_trip(tmp_path):
    ph = phantom(0, "A")
    img_path, lab_path = write_phantom(ph, str(tmp_path), "case")
    assert img_path == str(tmp_path / "case.nii.gz")
    assert lab_path == str(tmp_path / "labels" / "final" / "case.nii.gz")
    for path, arr, dtype in ((img_path, ph.image, np.int16), (lab_path, ph.label, np.uint8)):
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        assert data.dtype == dtype and data.shape == arr.shape
        assert np.array_equal(data, arr)
        assert np.allclose(img.affine, ph.affine)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    # No temporary files left behind; only the two studies.
    assert sorted(os.listdir(tmp_path)) == ["case.nii.gz", "labels"]
    assert os.listdir(tmp_path / "labels" / "final") == ["case.nii.gz"]


def test_write_without_label_and_custom_label_dir(tmp_path):
    ph = make_phantom(5, shape=SMALL)
    img_path, lab_path = write_phantom(ph, str(tmp_path / "images"), "a", label_dir=None)
    assert lab_path is None and os.listdir(tmp_path / "images") == ["a.nii.gz"]
    _, lab_path = write_phantom(ph, str(tmp_path / "images"), "b", label_dir=str(tmp_path / "gt"))
    assert lab_path == str(tmp_path / "gt" / "b.nii.gz") and os.path.exists(lab_path)


# Hard cases -----------------------------------------------------------------------------------


def test_unknown_hard_case_and_site_rejected():
    with pytest.raises(ValueError, match="hard case"):
        make_phantom(0, shape=SMALL, hard="no_such_case")
    with pytest.raises(ValueError, match="site"):
        make_phantom(0, shape=SMALL, site="Z")
    assert set(HARD_CASES) == {"missing_organ", "enlarged_organ", "touching", "low_contrast", "streaks"}
    assert set(ORGAN_CASES) == {"hypodense_organ"}


@pytest.mark.parametrize("seed", [0, 1])
def test_missing_organ(seed):
    ph = phantom(seed, "A", "missing_organ")
    missing = ph.meta["missing"]
    assert "gall_bladder" in missing
    vol = volumes(ph)
    for n in STRUCTURES:
        if n in missing:
            assert vol[CLASS_INDEX[n]] == 0, n
        else:
            assert vol[CLASS_INDEX[n]] >= 20, n


def test_enlarged_organ():
    base, big = phantom(0, "A"), phantom(0, "A", "enlarged_organ")
    enlarged = dict(big.meta["enlarged"])
    assert "spleen" in enlarged
    for n in enlarged:
        assert volumes(big)[CLASS_INDEX[n]] > 1.3 * volumes(base)[CLASS_INDEX[n]], n


def test_touching():
    base, hard = phantom(0, "A"), phantom(0, "A", "touching")
    for a, b in (("liver", "kidney_right"), ("spleen", "kidney_left")):
        assert touching_faces(base.label, a, b) == 0, (a, b)  # a fat plane in the normal case
        assert touching_faces(hard.label, a, b) > 20, (a, b)


def test_low_contrast():
    base, hard = phantom(0, "A"), phantom(0, "A", "low_contrast")
    liver = core_median(hard, "liver")
    for n in ("spleen", "kidney_right", "kidney_left", "pancreas", "postcava"):
        assert abs(core_median(hard, n) - liver) <= 15, n
    assert abs(core_median(base, "kidney_right") - core_median(base, "liver")) > 30
    assert hard.meta["noise_hu"] > base.meta["noise_hu"]


def test_streaks():
    base, hard = phantom(0, "A"), phantom(0, "A", "streaks")
    assert hard.meta["metal"] and hard.meta["metal_slices"]
    assert np.array_equal(base.label, hard.label)  # artefacts change the image, not the truth
    assert hard.image.max() >= 2500 > base.image.max()
    k = hard.meta["metal_slices"][0]
    diff = np.abs(hard.image[:, :, k].astype(float) - base.image[:, :, k])
    assert diff[base.image[:, :, k] > -500].mean() > 20
    far = [z for z in range(hard.image.shape[2]) if min(abs(z - s) for s in hard.meta["metal_slices"]) > 12]
    assert far and np.array_equal(hard.image[:, :, far], base.image[:, :, far])


def test_hypodense_organ_changes_that_organ_alone():
    base, hard = phantom(0, "A"), phantom(0, "A", "hypodense_organ")
    odd = hard.meta["hypodense"]
    assert np.array_equal(base.label, hard.label)  # the organ keeps its shape and its label
    assert 10 <= core_median(hard, odd) <= 55 and core_median(base, odd) >= 90  # portal phase: it did not enhance
    organ = hard.label == CLASS_INDEX[odd]
    near = ndimage.binary_dilation(organ, iterations=4)
    assert not np.array_equal(hard.image[organ], base.image[organ])
    assert np.array_equal(hard.image[~near], base.image[~near])  # the rest of the volume as it was
    assert {k: v for k, v in hard.meta["organ_hu"].items() if k != odd} == {
        k: v for k, v in base.meta["organ_hu"].items() if k != odd}
    # Which organ varies with the seed.
    assert len({make_phantom(s, shape=SMALL, hard="hypodense_organ").meta["hypodense"] for s in range(8)}) >= 3


# Sample folders --------------------------------------------------------------------------------


def test_sample_studies_skip_existing(tmp_path, monkeypatch):
    calls = []
    real = phantoms.make_phantom

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(phantoms, "make_phantom", counting)
    paths = make_sample_studies(str(tmp_path), n=3, seed=7, with_labels=True, shape=SMALL)
    assert paths == [str(tmp_path / f"phantom_{i:03d}.nii.gz") for i in range(3)]
    assert all(os.path.exists(p) for p in paths)
    labels = tmp_path / "labels" / "final"
    assert sorted(os.listdir(labels)) == [f"phantom_{i:03d}.nii.gz" for i in range(3)]
    assert len(calls) == 3
    sites = {nib.load(p).header.get_zooms() for p in paths}
    assert len(sites) == 3  # consecutive studies come from different sites
    before = {p: os.stat(p).st_mtime_ns for p in paths}

    assert make_sample_studies(str(tmp_path), n=3, seed=7, with_labels=True, shape=SMALL) == paths
    assert len(calls) == 3  # nothing rebuilt
    assert {p: os.stat(p).st_mtime_ns for p in paths} == before

    os.remove(labels / "phantom_001.nii.gz")
    make_sample_studies(str(tmp_path), n=3, seed=7, with_labels=True, shape=SMALL)
    assert len(calls) == 4 and os.path.exists(labels / "phantom_001.nii.gz")
    assert {p: os.stat(p).st_mtime_ns for p in paths} == before  # the image was left alone
    # The rebuilt label is the same study as before (deterministic seeds per index).
    lab = np.asanyarray(nib.load(str(labels / "phantom_001.nii.gz")).dataobj)
    again = real(phantoms.sample_seed(7, 1), shape=SMALL, site=SITES[sorted(SITES)[1]])
    assert np.array_equal(lab, again.label)


def test_sample_studies_without_labels_and_cli(tmp_path):
    make_sample_studies(str(tmp_path / "a"), n=2, seed=1, shape=SMALL)
    assert sorted(os.listdir(tmp_path / "a")) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    rc = phantoms.main([str(tmp_path / "b"), "--n", "2", "--seed", "1", "--labels", "labels/final",
                        "--shape", *map(str, SMALL)])
    assert rc == 0
    assert sorted(os.listdir(tmp_path / "b" / "labels" / "final")) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    a = np.asanyarray(nib.load(str(tmp_path / "a" / "phantom_001.nii.gz")).dataobj)
    b = np.asanyarray(nib.load(str(tmp_path / "b" / "phantom_001.nii.gz")).dataobj)
    assert np.array_equal(a, b)
