"""The infer task in-process: ensemble averaging, DICOM series input, and probabilities to labels."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch

from lib.app import build_tasks
from lib.transforms.labels import probs_to_label
from lib.weights import RELEASED_FILES
from support import shared_path, write_synthetic_checkpoint


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    work = tmp_path_factory.mktemp("infer")
    for backbone, seed in (("segresnet", 0), ("unet", 1)):
        write_synthetic_checkpoint(backbone, str(work / "w" / RELEASED_FILES[backbone]), seed=seed)
    return build_tasks(
        str(work / "app"),
        str(work / "studies"),
        {"models": "unet,segresnet", "weights_dir": str(work / "w"), "use_pretrained_model": "false", "overlap": "0"},
    )


def _small_ct(tmp_path):
    from testing.phantoms import make_phantom, write_phantom

    ph = make_phantom(3)
    # A small window of the phantom keeps the U-Net to one sliding window on the CPU.
    ph_img = ph.image[32:96, 32:96, 16:64]
    shift = ph.affine[:3, :3] @ np.array([32, 32, 16])
    aff = ph.affine.copy()
    aff[:3, 3] += shift
    path = str(tmp_path / "small.nii.gz")
    nib.save(nib.Nifti1Image(ph_img, aff), path)
    return path


def test_ensemble_probabilities_are_the_mean_of_the_backbones(tasks, tmp_path):
    path = _small_ct(tmp_path)
    ens = tasks.infers["ensemble"]
    data = ens.run_pre_transforms({"image": path}, ens.pre_transforms())
    image = data["image"]
    p_ens = ens.probabilities(image, {}, "cpu")
    p_unet = tasks.infers["unet"].probabilities(image, {}, "cpu")
    p_seg = tasks.infers["segresnet"].probabilities(image, {}, "cpu")
    assert p_ens.shape == (25,) + tuple(image.shape[1:])
    torch.testing.assert_close(torch.as_tensor(p_ens), (torch.as_tensor(p_unet) + torch.as_tensor(p_seg)) / 2)
    assert not torch.allclose(torch.as_tensor(p_unet), torch.as_tensor(p_seg)), "two different models"


def test_the_ensemble_result_says_where_the_time_went(tasks, tmp_path):
    label_file, result = tasks.infers["ensemble"]({"image": _small_ct(tmp_path), "device": "cpu"})
    os.remove(label_file)
    stages = result["stages"]
    assert list(stages) == ["pre", "unet", "segresnet", "label_map", "resample", "write"], stages
    assert all(v >= 0 for v in stages.values()) and stages["unet"] > 0 and stages["segresnet"] > 0
    assert sum(stages.values()) == pytest.approx(result["latencies"]["total"], rel=0.15, abs=0.1)


def test_most_probable_organ_wins_where_masks_overlap():
    probs = torch.zeros(3, 8, 8, 8)
    probs[0, 2:6, 2:6, 2:6] = 0.7
    probs[1, 4:8, 4:8, 4:8] = 0.9
    probs[2, 0, 0, 0] = 0.4  # below threshold: never labelled
    label = probs_to_label(probs, [6, 1, 3])[0]
    assert label[3, 3, 3] == 6 and label[5, 5, 5] == 1 and label[7, 7, 7] == 1
    assert label[0, 0, 0] == 0
    assert set(torch.unique(label).tolist()) == {0, 1, 6}


def test_only_the_largest_component_of_each_organ_is_kept():
    probs = torch.zeros(1, 12, 12, 12)
    probs[0, 1:5, 1:5, 1:5] = 0.8  # 64 voxels
    probs[0, 8:10, 8:10, 8:10] = 0.8  # 8 voxels, separate
    label = probs_to_label(probs, [6])[0]
    assert int((label == 6).sum()) == 64 and label[9, 9, 9] == 0


def _corners(img):
    shape = np.array(img.shape) - 1
    pts = [img.affine @ np.r_[np.array(c) * shape, 1.0] for c in np.ndindex(2, 2, 2)]
    return sorted(tuple(np.round(p[:3], 1)) for p in pts)


def test_dicom_series_is_segmented_on_its_own_grid(tasks):
    series = shared_path("data", "totalseg-example", "dicom")
    ref = nib.load(shared_path("data", "totalseg-example", "dicom-seg.nii.gz"))
    label_file, result = tasks.infers["segresnet"]({"image": series, "device": "cpu", "overlap": 0.0})
    lab = nib.load(label_file)
    assert lab.shape == ref.shape == (512, 512, 20)
    # The series' own grid (TotalSegmentator's label of it shares it): the same world positions for the
    # volume's corners, whichever way each file orders its axes.
    assert _corners(lab) == _corners(ref)
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= set(range(26))
    os.remove(label_file)
