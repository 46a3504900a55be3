"""From per-organ sigmoid probabilities to a label map on the input's own grid."""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import KeepLargestConnectedComponent, MapTransform, SpatialResample
from monai.utils import optional_import

logger = logging.getLogger(__name__)


def largest_component_backend(device) -> str:
    """Where MONAI's ``KeepLargestConnectedComponent`` labels components for a tensor on ``device``:
    "cucim" (on the GPU: cuCIM and CuPy installed, tensor on CUDA) or "scikit-image" (on the host)."""
    if torch.device(device).type != "cuda":
        return "scikit-image"
    _, has_cucim = optional_import("cucim.skimage")
    _, has_cupy = optional_import("cupy")
    if has_cucim and has_cupy:
        return "cucim"
    _warn_host_path()
    return "scikit-image"


@functools.lru_cache(maxsize=None)
def _warn_host_path() -> None:
    """Said once per process."""
    logger.warning(
        "largest connected component on the CPU (cuCIM not installed): the organ masks go to the host "
        "for it; install requirements-gpu.txt to keep it on the GPU"
    )


def organ_masks(probs: torch.Tensor, threshold: float = 0.5, largest_component: bool = True) -> torch.Tensor:
    """Binary organ masks from probabilities (C, X, Y, Z): threshold, then largest 26-connected component.

    Returns a bool tensor of the same shape, on the same device. On a GPU the components are labelled
    there when cuCIM is installed (MONAI dispatches to it), else on the host (``largest_component_backend``).
    """
    masks = probs >= threshold
    if largest_component and masks.any():
        largest_component_backend(masks.device)  # says once when a GPU tensor has to take the host path
        # Every channel is an organ (no background channel), so name them all: by default MONAI's
        # one-hot mode leaves channel 0 alone as if it were background. The bool masks are edited in
        # place (no float copy of the C volumes).
        keep = KeepLargestConnectedComponent(
            applied_labels=list(range(masks.shape[0])), is_onehot=True, independent=True, connectivity=3
        )
        masks = torch.as_tensor(keep(masks)).bool()
    return masks.to(probs.device)


def probs_to_label(
    probs: torch.Tensor,
    class_indices: Sequence[int],
    threshold: float = 0.5,
    largest_component: bool = True,
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Label map (1, X, Y, Z) uint8 from probabilities (C, X, Y, Z) of the classes ``class_indices``.

    A voxel gets the class whose (post-processed) mask covers it; where several masks cover it the most
    probable class wins; voxels no mask covers are 0.
    """
    if probs.shape[0] != len(class_indices):
        raise ValueError(f"{probs.shape[0]} probability channels for {len(class_indices)} classes")
    if masks is None:
        masks = organ_masks(probs, threshold, largest_component)
    score = torch.where(masks, probs.float(), torch.zeros((), device=probs.device))
    best, arg = score.max(dim=0)
    lut = torch.as_tensor(list(class_indices), dtype=torch.uint8, device=probs.device)
    label = torch.where(best > 0, lut[arg], torch.zeros((), dtype=torch.uint8, device=probs.device))
    return label[None]


class ProbsToLabeld(MapTransform):
    """Dictionary version of ``probs_to_label``; keeps the working-grid geometry of ``key``."""

    def __init__(self, keys, class_indices: Sequence[int], threshold: float = 0.5, largest_component: bool = True):
        super().__init__(keys)
        self.class_indices = list(class_indices)
        self.threshold = threshold
        self.largest_component = largest_component

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            probs = d[key]
            label = probs_to_label(torch.as_tensor(probs), self.class_indices, self.threshold, self.largest_component)
            d[key] = MetaTensor(label, affine=probs.affine, meta=dict(probs.meta)) if isinstance(probs, MetaTensor) else label
        return d


class ResampleToInputd(MapTransform):
    """Put a working-grid label map back onto the input image's own grid (shape and affine).

    The working-grid affine already accounts for orientation, spacing and crop, so one nearest-neighbour
    resampling to the input's ``original_affine`` and ``spatial_shape`` undoes all of them at once.
    """

    def __init__(self, keys, ref_key: str = "image"):
        super().__init__(keys)
        self.ref_key = ref_key
        self.resample = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float32)

    def __call__(self, data):
        d = dict(data)
        ref = d[self.ref_key]
        meta = ref.meta if isinstance(ref, MetaTensor) else d[f"{self.ref_key}_meta_dict"]
        dst_affine = torch.as_tensor(np.asarray(meta["original_affine"]), dtype=torch.float64)
        shape = [int(s) for s in np.asarray(meta["spatial_shape"]).ravel()]
        for key in self.key_iterator(d):
            src = d[key]
            if not isinstance(src, MetaTensor):
                src = MetaTensor(torch.as_tensor(src), affine=ref.affine)
            out = self.resample(src.float(), dst_affine=dst_affine, spatial_size=shape)
            out = torch.round(torch.as_tensor(out)).to(torch.uint8)
            d[key] = MetaTensor(out[0], affine=dst_affine)  # (X, Y, Z): the writer wants no channel
            d[f"{key}_meta_dict"] = {"affine": dst_affine.numpy(), "original_affine": dst_affine.numpy()}
        return d


class LabelToChannelsd(MapTransform):
    """Label map (1, X, Y, Z) of SuPreM class indices -> one binary channel per class in ``class_indices``.

    Multi-label targets (one sigmoid channel per organ) keep overlap and uncertainty meaningful.
    """

    def __init__(self, keys, class_indices: Sequence[int]):
        super().__init__(keys)
        self.class_indices = list(class_indices)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            idx = torch.as_tensor(self.class_indices, device=lab.device).view(-1, 1, 1, 1)
            out = (torch.as_tensor(lab)[0:1] == idx).float()
            d[key] = MetaTensor(out, meta=dict(lab.meta), affine=lab.affine) if isinstance(lab, MetaTensor) else out
        return d
