"""Per-backbone sigmoid probabilities on the working grid: the model part of inference and scoring."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Dict, Optional, Sequence, Tuple

import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer

from lib.networks import build_network, load_checkpoint
from lib.transforms.recipe import Recipe

logger = logging.getLogger(__name__)

_AMP = {"fp16": torch.float16, "bf16": torch.bfloat16}


class _Channels(torch.nn.Module):
    """Keep only the wanted output channels so the sliding-window buffer holds only those."""

    def __init__(self, net: torch.nn.Module, channels: Optional[Sequence[int]]):
        super().__init__()
        self.net = net
        self.channels = None if channels is None else list(channels)

    def forward(self, x):
        y = self.net(x)
        return y if self.channels is None else y[:, self.channels]


class NetworkCache:
    """Loaded networks by (backbone, file, device), reloaded when the file changes (a new model published)."""

    def __init__(self):
        self._nets: Dict[Tuple[str, str], Tuple[Tuple[int, int], torch.nn.Module]] = {}
        self._lock = threading.Lock()
        self.loads = 0  # networks built and loaded from a file so far

    def get(self, backbone: str, path: str, device: torch.device) -> torch.nn.Module:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
        key = (backbone, f"{path}@{device}")
        with self._lock:
            hit = self._nets.get(key)
            if hit and hit[0] == stamp:
                return hit[1]
            net = build_network(backbone)
            load_checkpoint(net, path)
            net = net.to(device).eval()
            self._nets[key] = (stamp, net)
            self.loads += 1
            logger.info(f"Loaded {backbone} from {path} on {device}")
            return net

    def clear(self):
        with self._lock:
            self._nets.clear()


def autocast(device: torch.device, amp: str):
    """Mixed-precision context for ``amp`` ("none", "fp16", "bf16") on ``device``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = _AMP[amp]
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16  # CPU autocast has no fp16 kernels worth using
    return torch.autocast(device_type=device.type, dtype=dtype)


def sliding_window_probs(
    net: torch.nn.Module,
    image: torch.Tensor,
    recipe: Recipe,
    device: torch.device,
    channels: Optional[Sequence[int]] = None,
    out_device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Sigmoid probabilities (C, X, Y, Z) float32 of one preprocessed image (1, X, Y, Z) in 0..1.

    ``channels`` picks network output channels (released order, 0-based); the window, overlap,
    blending, batch and precision come from ``recipe``.
    """
    inferer = SlidingWindowInferer(
        roi_size=recipe.roi,
        sw_batch_size=recipe.sw_batch_size,
        overlap=recipe.overlap,
        mode=recipe.blend,
        sw_device=device,
        device=out_device or device,
    )
    x = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    x = x[None].to(device=device, dtype=torch.float32)
    model = _Channels(net, channels)
    with torch.no_grad(), autocast(device, recipe.amp):
        logits = inferer(x, model)
    return torch.sigmoid(torch.as_tensor(logits).float())[0]


def backbone_probs(
    cache: NetworkCache,
    registry,
    backbones: Sequence[str],
    image: torch.Tensor,
    recipe: Recipe,
    device: torch.device,
    channels: Optional[Sequence[int]] = None,
):
    """Yield (backbone, sigmoid probabilities on the working grid) for each backbone, one at a time.

    The one loop behind the infer tasks (which average) and the scorer (which stacks for the attention).
    """
    if not backbones:
        raise RuntimeError("no backbone has weights loaded")
    for b in backbones:
        net = cache.get(b, registry.current_path(b), device)
        yield b, sliding_window_probs(net, image, recipe, device, channels)
