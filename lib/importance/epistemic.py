"""Predictive (binary) entropy of the models' mean probability: MONAI Label's ``epistemic`` kind of score.

MONAI Label's ``Epistemic`` strategy ranks images by one number per image kept in its info
(``epistemic_entropy``). This module is the one computation of it, shared by the benchmark's
mean-entropy baseline and the calibrated ranking's uncertainty, so the baseline the app is compared
with is the computation the app itself could serve. Pure functions of tensors (CPU or CUDA).
"""

from __future__ import annotations

import torch

# The image-info key MONAI Label's ``Epistemic`` strategy ranks by.
EPISTEMIC_KEY = "epistemic_entropy"
# Probabilities are clamped to [EPS, 1 - EPS] so that log stays finite (entropy >= ~1.5e-5 nats).
EPS = 1e-6


def binary_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-voxel binary entropy, in nats (maximum ln 2), of the mean over models of ``probs``.

    ``probs``: ``(M, C, ...)`` sigmoid probabilities of M models (any float dtype; computed in float32).
    Returns a ``(C, ...)`` float32 tensor on the input's device: ``-(q ln q + (1-q) ln(1-q))`` with
    ``q = clamp(mean_m p_m, EPS, 1 - EPS)``. Disagreement between models raises it as doubt within one
    model does (the entropy of the mean, not the mean of the entropies).
    """
    mean = probs.float().mean(0).clamp(EPS, 1 - EPS)
    return -(mean * mean.log() + (1 - mean) * (1 - mean).log())


def mean_binary_entropy(probs: torch.Tensor) -> float:
    """One number per volume: ``binary_entropy`` averaged over every organ channel and voxel (nats)."""
    return float(binary_entropy(probs).mean())
