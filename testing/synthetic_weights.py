"""Deterministic synthetic weights in the released checkpoint format.

This is the recipe the SuPreM golden test vectors were produced with
(``shared/suprem/golden/README.md``): tests load these weights and compare against the stored
logits, and server tests can save them as stand-in ``.pth`` files of the released format.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from lib.networks import state_dict_in_released_format


def synthetic_value(key: str, shape: tuple, rs: np.random.RandomState) -> torch.Tensor:
    """One synthetic tensor for ``key`` (released name) of ``shape``, drawn from ``rs``.

    Scales keep activations in a sane range: fan-in scaled weights, small biases, norm weights near
    1, positive running variances. ``num_batches_tracked`` is ``tensor(0)`` and draws nothing.
    Every other value is float32, integer buffers included, exactly as the golden vectors were
    generated. Note what that means for Swin's ``relative_position_index`` (int64): loading casts
    the small float noise to all zeros, so every attention position reads row 0 of its bias table.
    The golden logits were produced that way and depend on it (with the true index they differ by
    about 0.04); real released checkpoints hold the true index.
    """
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.tensor(0)
    n = rs.standard_normal(shape).astype(np.float32)
    if leaf == "running_var":
        v = np.abs(n) + 0.5
    elif leaf == "running_mean":
        v = 0.1 * n
    elif leaf == "bias" or key.endswith("relative_position_bias_table"):
        v = 0.02 * n
    elif len(shape) == 1:
        v = 1 + 0.1 * n
    elif key.endswith("organ_embedding"):
        v = n
    else:
        v = n / np.sqrt(np.prod(shape[1:]))
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))


def synthetic_released_state_dict(
    backbone: str, seed: int = 0, model: Optional[nn.Module] = None
) -> Dict[str, torch.Tensor]:
    """A full ``net`` state dict (``module.``-prefixed keys) of synthetic weights for ``backbone``.

    Walks the keys and shapes of ``build_network(backbone).state_dict()`` in order (the released
    order) with one ``numpy.random.RandomState(seed)``. Pass ``model`` (already built for this
    backbone) to skip building one. Save as ``{"net": result}`` to get a released-format file.
    """
    if model is None:
        from lib.networks import build_network

        model = build_network(backbone)
    rs = np.random.RandomState(seed)
    return {
        key: synthetic_value(key, tuple(value.shape), rs)
        for key, value in state_dict_in_released_format(model).items()
    }


def write_synthetic_checkpoint(backbone: str, path: str, seed: int = 0) -> str:
    """A checkpoint in the released format ({"net": {"module.*": ...}}) with synthetic weights."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"net": synthetic_released_state_dict(backbone, seed=seed), "epoch": 2100}, path)
    return path


def synthetic_registry(folder, backbone: str = "segresnet"):
    """A WeightsRegistry under ``folder`` serving a synthetic checkpoint in the released format."""
    from lib.networks import validate_checkpoint
    from lib.weights import RELEASED_FILES, WeightsRegistry

    weights = os.path.join(str(folder), "weights")
    write_synthetic_checkpoint(backbone, os.path.join(weights, RELEASED_FILES[backbone]))
    registry = WeightsRegistry(
        os.path.join(str(folder), "model"), validate_checkpoint, weights_dir=weights, use_pretrained_model=False
    )
    registry.resolve(backbone)
    return registry
