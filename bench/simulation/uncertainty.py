"""Mean entropy: the plain uncertainty baseline (what MONAI Label's epistemic scoring ranks volumes by)."""

from __future__ import annotations

import torch

# The image-info key MONAI Label's ``Epistemic`` strategy ranks by.
ENTROPY_KEY = "epistemic_entropy"


def binary_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-voxel binary entropy (nats) of the mean over models of ``probs`` (models, C, ...)."""
    mean = probs.float().mean(0).clamp(1e-6, 1 - 1e-6)
    return -(mean * mean.log() + (1 - mean) * (1 - mean).log())


def mean_binary_entropy(probs: torch.Tensor) -> float:
    """One number per volume: binary entropy averaged over every organ channel and voxel."""
    return float(binary_entropy(probs).mean())
