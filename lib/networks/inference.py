"""Per-backbone sigmoid probabilities on the working grid: the model part of inference and scoring.

``BackboneSet`` is what an infer task and the scorer share: which backbones they run, which of those
have weights now, the network output channels of their labels, and one probability volume per backbone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer

from lib.classes import CLASS_INDEX
from lib.files import file_version
from lib.networks import build_network, load_checkpoint
from lib.transforms.recipe import AMP_DTYPES, Recipe

logger = logging.getLogger(__name__)


class _Channels(torch.nn.Module):
    """Keep only the wanted output channels so the sliding-window buffer holds only those."""

    def __init__(self, net: torch.nn.Module, channels: Optional[Sequence[int]], channels_last: bool = False):
        super().__init__()
        self.net = net
        self.channels = None if channels is None else list(channels)
        self.channels_last = channels_last

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        y = self.net(x)
        return y if self.channels is None else y[:, self.channels]


class NetworkCache:
    """Loaded networks by (backbone, file, device, form), reloaded when the file changes (a new model
    published). ``compile`` / ``channels_last`` give the network in that form, kept beside the plain one,
    so a process compiles a model once and every later window reuses it."""

    def __init__(self):
        self._nets: Dict[Tuple, Tuple[Tuple[int, int], torch.nn.Module]] = {}
        self._lock = threading.Lock()
        self.loads = 0  # networks built and loaded from a file so far

    def get(
        self, backbone: str, path: str, device: torch.device, compile: bool = False, channels_last: bool = False
    ) -> torch.nn.Module:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
        key = (backbone, f"{path}@{device}", bool(compile), bool(channels_last))
        with self._lock:
            hit = self._nets.get(key)
            if hit and hit[0] == stamp:
                return hit[1]
            net = build_network(backbone)
            load_checkpoint(net, path)
            net = net.to(device).eval()
            if channels_last:
                net = net.to(memory_format=torch.channels_last_3d)
            if compile:
                # Compiled lazily at the first window (and once more for a last, smaller batch of windows).
                net = torch.compile(net)
            self._nets[key] = (stamp, net)
            self.loads += 1
            form = ", ".join(f for f, on in (("compiled", compile), ("channels-last", channels_last)) if on)
            logger.info(f"Loaded {backbone} from {path} on {device}{f' ({form})' if form else ''}")
            return net

    def clear(self):
        with self._lock:
            self._nets.clear()


def cpu_runs_bf16() -> bool:
    """Whether this CPU has oneDNN's native bf16 kernels (AVX-512 or AMX on x86), as torch reports it.

    Without them bf16 autocast falls back to reference kernels: on a 2-core AMD EPYC with AVX2 only, one
    SegResNet pass over a 96^3 window took 5.0 s in fp32 and did not finish in 295 s in bf16 (2026-12-04).
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


_PRECISION_NOTED = set()  # (device type, asked) pairs already logged, so the log says it once


def effective_amp(device, amp: str) -> str:
    """The precision a forward pass on ``device`` runs in when ``amp`` ("none", "fp16", "bf16") is asked.

    On a CPU: fp16 becomes bf16 (CPU autocast has no fp16 kernels worth using), and bf16 runs only where
    the CPU has native kernels (``cpu_runs_bf16``), else fp32 ("none"), logged once. On a GPU without
    bf16 (before Ampere): fp16.
    """
    device = torch.device(device)
    if amp == "none":
        return "none"
    runs = amp
    if device.type == "cpu":
        runs = "bf16" if cpu_runs_bf16() else "none"
    elif device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        runs = "fp16"
    if runs != amp and (device.type, amp) not in _PRECISION_NOTED:
        _PRECISION_NOTED.add((device.type, amp))
        if runs == "none":
            why = f"this CPU has no native bf16 kernels (torch: {torch.backends.cpu.get_cpu_capability()})"
        else:
            why = f"{device.type} autocast has no fast {amp} kernels here"
        logger.info(f"amp {amp} asked on {device.type}: running {'fp32' if runs == 'none' else runs}, as {why}")
    return runs


def precision_name(amp: str) -> str:
    """"fp32" for "none", else the amp mode: what a user reads in ``/info/``."""
    return "fp32" if amp == "none" else amp


def autocast(device: torch.device, amp: str):
    """Mixed-precision context for ``amp`` ("none", "fp16", "bf16") on ``device``, in the precision that
    device runs well (``effective_amp``)."""
    runs = effective_amp(device, amp)
    if runs == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AMP_DTYPES[runs])


def set_tf32(enabled: Optional[bool]) -> None:
    """TF32 for float32 convolutions and matrix products on the GPU: True, False, or None (torch's default,
    left as it is). Process-wide, as torch's switches are."""
    if enabled is None:
        return
    precision = "tf32" if enabled else "ieee"
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision = precision
        torch.backends.cuda.matmul.fp32_precision = precision
    else:  # torch before the fp32_precision switches
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled


def synchronize(device) -> None:
    """Wait for the work queued on ``device`` (a GPU runs ahead of Python), so a stage's time is its own."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(stages: Dict[str, float], name: str, device) -> Iterator[None]:
    """Add the seconds of the ``with`` block, its GPU work included, to ``stages[name]``."""
    start = time.perf_counter()
    yield
    synchronize(device)
    stages[name] = round(stages.get(name, 0.0) + time.perf_counter() - start, 3)


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
    set_tf32(recipe.tf32)
    x = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    x = x[None].to(device=device, dtype=torch.float32)
    model = _Channels(net, channels, recipe.channels_last)
    with torch.no_grad(), autocast(device, recipe.amp):
        logits = inferer(x, model)
    return torch.sigmoid(torch.as_tensor(logits).float())[0]


class BackboneSet:
    """The backbones a task runs, with their weights (a registry) and the output channels of its labels.

    ``registry``: anything with ``available(backbone)``, ``current_path(backbone)`` and ``info(backbone)``
    (``lib.weights.WeightsRegistry``); a backbone is used while it has weights, so a model published by
    a round, or a file that appears later, is picked up without a restart.
    """

    def __init__(self, backbones: Sequence[str], registry, labels: Sequence[str], cache: Optional[NetworkCache] = None):
        self.names = list(backbones)
        self.registry = registry
        self.labels = list(labels)
        # Network output channel of each label (released order, class index = channel + 1).
        self.channels = [CLASS_INDEX[name] - 1 for name in self.labels]
        self.cache = cache or NetworkCache()

    def active(self) -> List[str]:
        """The backbones that have weights now."""
        return [b for b in self.names if self.registry.available(b)]

    def versions(self) -> Dict[str, str]:
        """``{backbone: version}`` of the model files in use now: a result made with others is stale."""
        return {b: file_version(self.registry.current_path(b)) for b in self.active()}

    def why_unavailable(self) -> str:
        """Why none of the backbones has weights (the registry's problem per backbone)."""
        return "; ".join(f"{b}: {self.registry.info(b).get('problem') or 'no weights'}" for b in self.names)

    def probabilities(self, image: torch.Tensor, recipe: Recipe, device: torch.device) -> Iterator[Tuple[str, torch.Tensor]]:
        """Yield (backbone, sigmoid probabilities (C, X, Y, Z) of the labels) for each active backbone, one
        at a time, so a caller that averages holds one volume besides its sum.

        Raises RuntimeError naming the backbones when none has weights.
        """
        active = self.active()
        if not active:
            raise RuntimeError(f"no weights loaded for {', '.join(self.names)}")
        for backbone in active:
            path = self.registry.current_path(backbone)
            net = self.cache.get(backbone, path, device, compile=recipe.compile, channels_last=recipe.channels_last)
            yield backbone, sliding_window_probs(net, image, recipe, device, self.channels)
