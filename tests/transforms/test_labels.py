"""Probabilities to organ masks and label maps, back on the input grid: on the host without cuCIM, and on
the GPU (cuCIM for the largest component) with the same voxels as the host path."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from lib.transforms import labels
from lib.transforms.labels import ProbsToLabeld, ResampleToInputd, largest_component_backend, organ_masks

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _blobs(seed: int, channels: int = 6, shape=(40, 36, 28)) -> torch.Tensor:
    """Probabilities whose 0.5 masks have several components per channel, of different sizes."""
    rs = np.random.RandomState(seed)
    noise = ndimage.gaussian_filter(rs.rand(channels, *shape), sigma=(0, 2.0, 2.0, 2.0))
    lo, hi = noise.min(axis=(1, 2, 3), keepdims=True), noise.max(axis=(1, 2, 3), keepdims=True)
    return torch.as_tensor((noise - lo) / (hi - lo), dtype=torch.float32)


def _largest_component_reference(probs: torch.Tensor) -> np.ndarray:
    """Per channel: scipy's 26-connected labelling, the largest component kept."""
    out = np.zeros(probs.shape, bool)
    for c, channel in enumerate(probs.numpy() >= 0.5):
        lab, n = ndimage.label(channel, structure=np.ones((3, 3, 3)))
        if n:
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            out[c] = lab == sizes.argmax()
    return out


@pytest.fixture
def without_cucim(monkeypatch):
    """As on an install without the GPU extras: ``import cucim`` fails."""
    for name in ("cucim", "cucim.skimage", "cupy"):
        monkeypatch.setitem(sys.modules, name, None)
    labels._warn_host_path.cache_clear()


def test_without_cucim_the_host_path_is_taken_cleanly_and_keeps_the_largest_component(without_cucim, caplog):
    probs = _blobs(0)
    n_components = [ndimage.label(c, structure=np.ones((3, 3, 3)))[1] for c in probs.numpy() >= 0.5]
    assert max(n_components) > 1, "the test needs channels with several components"
    with caplog.at_level(logging.WARNING, logger="lib.transforms.labels"):
        masks = organ_masks(probs)
    assert masks.dtype == torch.bool and masks.device.type == "cpu"
    np.testing.assert_array_equal(masks.numpy(), _largest_component_reference(probs))
    assert largest_component_backend("cpu") == "scikit-image"
    assert not caplog.records, "a CPU tensor taking the CPU path is not worth a warning"
    # Probabilities on a GPU without cuCIM: the host path, said once (the device type alone decides).
    with caplog.at_level(logging.WARNING, logger="lib.transforms.labels"):
        assert largest_component_backend(torch.device("cuda")) == "scikit-image"
        assert largest_component_backend("cuda:0") == "scikit-image"
    assert len(caplog.records) == 1 and "requirements-gpu.txt" in caplog.records[0].getMessage()


def _label_and_resample(probs: torch.Tensor, device: str):
    """ProbsToLabeld then ResampleToInputd as the infer task runs them, probabilities on ``device``."""
    work_affine = torch.diag(torch.tensor([1.5, 1.5, 1.5, 1.0], dtype=torch.float64))
    work_affine[:3, 3] = torch.tensor([-20.0, 12.0, 30.0], dtype=torch.float64)
    input_affine = np.diag([-0.8, -0.8, 1.25, 1.0])  # LPS-like input grid, finer than the working grid
    input_affine[:3, 3] = [40.0, 60.0, 28.0]
    image = MetaTensor(
        torch.zeros((1,) + probs.shape[1:]),
        affine=work_affine,
        meta={"original_affine": input_affine, "spatial_shape": np.array([70, 64, 36])},
    )
    data = {"pred": MetaTensor(probs.to(device), affine=work_affine), "image": image}
    data = ProbsToLabeld(keys="pred", class_indices=list(range(1, probs.shape[0] + 1)))(data)
    label_device = data["pred"].device
    data = ResampleToInputd(keys="pred", ref_key="image")(data)
    return label_device, data["pred"]


def test_label_map_is_resampled_onto_the_input_grid_on_the_host():
    _, out = _label_and_resample(_blobs(1), "cpu")
    assert tuple(out.shape) == (70, 64, 36) and out.dtype == torch.uint8 and out.device.type == "cpu"
    assert int((out > 0).sum()) > 0 and len(torch.unique(out)) > 2


@cuda
def test_gpu_largest_component_has_the_voxels_of_the_host_path():
    probs = _blobs(2, channels=25, shape=(96, 80, 64))
    on_gpu = organ_masks(probs.cuda())
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), organ_masks(probs))


@cuda
def test_gpu_largest_component_goes_through_cucim():
    pytest.importorskip("cucim.skimage")
    assert largest_component_backend("cuda") == "cucim"


@cuda
def test_label_map_and_resampling_stay_on_the_gpu_with_the_host_voxels():
    probs = _blobs(3, channels=8)
    label_device, on_gpu = _label_and_resample(probs, "cuda")
    assert label_device.type == "cuda" and on_gpu.device.type == "cuda"
    _, on_host = _label_and_resample(probs, "cpu")
    assert torch.equal(on_gpu.cpu(), on_host)
