"""The precision follows the hardware: bf16 on a CPU only where it has native bf16 kernels, else fp32 with
one log line; ``/info/``'s infer tasks say what each backbone runs in."""

from __future__ import annotations

import logging

import pytest
import torch

from lib.infers.segmentation import SuPreMSegmentation
from lib.networks import inference
from lib.networks.inference import NetworkCache, autocast, effective_amp
from lib.transforms.recipe import PRESETS
from support import synthetic_registry


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set what torch says of this CPU's bf16 kernels (the real answer differs between machines)."""

    def force(native: bool):
        monkeypatch.setattr(inference, "cpu_runs_bf16", lambda: native)
        monkeypatch.setattr(inference, "_PRECISION_NOTED", set())

    return force


def _conv_output_dtype(amp: str) -> torch.dtype:
    conv = torch.nn.Conv3d(1, 2, 3)
    with torch.no_grad(), autocast(torch.device("cpu"), amp):
        return conv(torch.rand(1, 1, 6, 6, 6)).dtype


def test_bf16_asked_on_a_cpu_without_bf16_kernels_runs_in_fp32_said_once(cpu_bf16, caplog):
    cpu_bf16(False)
    with caplog.at_level(logging.INFO, logger=inference.__name__):
        assert effective_amp("cpu", "bf16") == "none"
        assert effective_amp("cpu", "fp16") == "none"
        assert _conv_output_dtype("bf16") == torch.float32
        assert _conv_output_dtype("bf16") == torch.float32
    said = [r.getMessage() for r in caplog.records if "running fp32" in r.getMessage()]
    assert len(said) == 2, said  # once for bf16, once for fp16: not once per forward pass
    assert "no native bf16 kernels" in said[0]


def test_bf16_runs_where_the_cpu_has_native_kernels(cpu_bf16):
    cpu_bf16(True)
    assert effective_amp("cpu", "bf16") == "bf16"
    assert effective_amp("cpu", "fp16") == "bf16"  # CPU autocast has no fp16 kernels worth using
    assert effective_amp("cpu", "none") == "none"
    assert _conv_output_dtype("bf16") == torch.bfloat16


@pytest.mark.parametrize("native, shown", [(False, "fp32"), (True, "bf16")])
def test_infer_task_info_shows_the_precision_each_backbone_runs_in(cpu_bf16, tmp_path, native, shown):
    if torch.cuda.is_available():
        pytest.skip("the CPU case: this machine's infer tasks run on its GPU")
    cpu_bf16(native)
    registry = synthetic_registry(tmp_path, "segresnet")
    task = SuPreMSegmentation(["segresnet"], registry, ["liver"], PRESETS["fast"], NetworkCache())
    assert task.info()["precision"] == {"segresnet": shown}
    recipe_task = SuPreMSegmentation(["segresnet"], registry, ["liver"], PRESETS["recipe"], NetworkCache())
    assert recipe_task.info()["precision"] == {"segresnet": "fp32"}


def test_compiled_and_channels_last_networks_are_cached_apart_from_the_plain_one(tmp_path):
    registry = synthetic_registry(tmp_path, "segresnet")
    path, cpu = registry.current_path("segresnet"), torch.device("cpu")
    cache = NetworkCache()
    plain = cache.get("segresnet", path, cpu)
    compiled = cache.get("segresnet", path, cpu, compile=True)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled is not plain
    assert cache.get("segresnet", path, cpu, compile=True) is compiled, "compiled once per process and file"
    last = cache.get("segresnet", path, cpu, channels_last=True)
    weight = next(p for p in last.parameters() if p.dim() == 5)
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert cache.loads == 3
