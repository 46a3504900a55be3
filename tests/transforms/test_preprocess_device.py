"""Pre-processing on the device that scores: the grid steps (orientation, spacing, window, crop) as tensor
ops on a GPU give the CPU's working-grid image, within interpolation round-off, on the shared real CT."""

from __future__ import annotations

import pytest
import torch
from monai.transforms import Compose

from lib.importance.scorer import VolumeScorer
from lib.transforms.recipe import PRESETS, inference_pre_transforms
from support import shared_path, synthetic_registry

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _working_grid(path: str, device=None):
    return Compose(inference_pre_transforms(PRESETS["recipe"], device=device))({"image": path})["image"]


@pytest.mark.parametrize("device", DEVICES)
def test_grid_steps_on_the_device_give_the_cpu_image(device):
    path = shared_path("data", "totalseg-example", "ct.nii.gz")
    on_cpu = _working_grid(path)
    on_device = _working_grid(path, device)
    assert on_device.device.type == device, "the working-grid image stays where it was made"
    assert on_device.shape == on_cpu.shape and on_device.dtype == torch.float32
    torch.testing.assert_close(on_device.affine.cpu().double(), on_cpu.affine.double())
    # Values are in 0..1; bilinear resampling on another device differs by float round-off only.
    assert (on_device.cpu() - on_cpu).abs().max().item() < 1e-4
    assert on_device.meta["spatial_shape"].tolist() == on_cpu.meta["spatial_shape"].tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_scorer_caches_its_preprocessing_on_the_host(tmp_path):
    path = shared_path("data", "totalseg-example", "ct.nii.gz")
    registry = synthetic_registry(tmp_path / "w", "segresnet")
    scorer = VolumeScorer(["segresnet"], registry, ["liver"], PRESETS["recipe"], device="cuda",
                          cache_dir=str(tmp_path / "cache"))
    first = scorer.preprocess(path)  # made on the GPU, stored from the host
    again = scorer.preprocess(path)  # read from the cache
    assert first.device.type == "cpu" and again.device.type == "cpu"
    torch.testing.assert_close(torch.as_tensor(first), torch.as_tensor(again))
    assert (first - _working_grid(path)).abs().max().item() < 1e-4
