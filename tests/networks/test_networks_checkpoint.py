"""load_checkpoint reads the released format strictly and refuses anything unsafe or ill-fitting;
save_checkpoint writes the released format atomically."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from lib.networks import CheckpointError, load_checkpoint, save_checkpoint, state_dict_in_released_format


def _tiny() -> nn.Module:
    return nn.Sequential(OrderedDict(conv=nn.Conv3d(1, 2, 3), norm=nn.BatchNorm3d(2)))


def _released(model: nn.Module, scale: float = 1.0) -> dict:
    return {k: (v * scale if v.is_floating_point() else v) for k, v in state_dict_in_released_format(model).items()}


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _RunsCode:
    """Pickles to a call of os.system: loading it the unsafe way would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_error_type_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_loads_released_format_with_optimizer_scheduler_and_epoch(tmp_path):
    source, target = _tiny(), _tiny()
    path = tmp_path / "released.pth"
    torch.save(
        {
            "net": _released(source),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0, 1]}]},
            "scheduler": {"last_epoch": 3, "base_lrs": [1e-4]},
            "epoch": 3,
        },
        path,
    )
    assert load_checkpoint(target, path) is target
    assert _same_weights(source, target)


def test_loads_bare_state_dict_without_module_prefix(tmp_path):
    source, target = _tiny(), _tiny()
    torch.save(source.state_dict(), tmp_path / "bare.pth")
    load_checkpoint(target, tmp_path / "bare.pth")
    assert _same_weights(source, target)


def test_loads_epoch_stored_as_numpy_scalar(tmp_path):
    source, target = _tiny(), _tiny()
    torch.save({"net": _released(source), "epoch": np.int64(7), "best": np.float64(0.9)}, tmp_path / "np.pth")
    load_checkpoint(target, tmp_path / "np.pth")
    assert _same_weights(source, target)


def test_loads_into_data_parallel_wrapper(tmp_path):
    source, target = _tiny(), nn.DataParallel(_tiny())
    torch.save({"net": _released(source)}, tmp_path / "released.pth")
    load_checkpoint(target, tmp_path / "released.pth")
    assert _same_weights(source, target.module)


def test_refuses_missing_key_naming_it_and_the_file(tmp_path):
    state = _released(_tiny())
    del state["module.norm.running_var"]
    path = tmp_path / "missing.pth"
    torch.save({"net": state}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_tiny(), path)
    assert str(path) in str(err.value)
    assert "missing" in str(err.value) and "norm.running_var" in str(err.value)


def test_refuses_unexpected_key_naming_it(tmp_path):
    state = _released(_tiny())
    state["module.out.weight"] = torch.zeros(3)
    torch.save({"net": state}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected.*out\.weight"):
        load_checkpoint(_tiny(), tmp_path / "extra.pth")


def test_refuses_mis_shaped_key_naming_it_with_both_shapes(tmp_path):
    state = _released(_tiny())
    state["module.conv.weight"] = torch.zeros(4, 1, 3, 3, 3)
    torch.save({"net": state}, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_tiny(), tmp_path / "shape.pth")
    message = str(err.value)
    assert "conv.weight" in message and "[4, 1, 3, 3, 3]" in message and "[2, 1, 3, 3, 3]" in message


def test_refused_checkpoint_leaves_model_weights_untouched(tmp_path):
    target = _tiny()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    state = _released(_tiny(), scale=3.0)
    state["module.unused"] = torch.zeros(1)
    torch.save({"net": state}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError):
        load_checkpoint(target, tmp_path / "extra.pth")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_refuses_checkpoint_without_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "no_net.pth")
    with pytest.raises(CheckpointError, match="net"):
        load_checkpoint(_tiny(), tmp_path / "no_net.pth")


def test_refuses_truncated_file_naming_it(tmp_path):
    full = tmp_path / "full.pth"
    torch.save({"net": _released(_tiny())}, full)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_tiny(), truncated)
    assert str(truncated) in str(err.value) and "not a readable torch checkpoint" in str(err.value)


@pytest.mark.parametrize(
    "content", [b"", b"<!DOCTYPE html><html><body>Rate limit exceeded</body></html>", b"\x00garbage" * 100]
)
def test_refuses_files_that_are_not_checkpoints_naming_them(tmp_path, content):
    path = tmp_path / "download.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint") as err:
        load_checkpoint(_tiny(), path)
    assert str(path) in str(err.value)


def test_refuses_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(_tiny(), tmp_path / "absent.pth")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle-protocol-2", "pickle-protocol-4"])
def test_refuses_pickle_that_would_run_code_without_running_it(tmp_path, writer):
    marker = tmp_path / "code_ran"
    payload = {"net": _released(_tiny()), "epoch": _RunsCode(str(marker))}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=int(writer[-1]))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_tiny(), path)
    message = str(err.value)
    assert str(path) in message
    assert "unsafe" in message or "untrusted" in message
    assert not marker.exists()


def test_refuses_numpy_array_payload_as_outside_the_allow_list(tmp_path):
    torch.save({"net": _released(_tiny()), "stats": np.zeros(3)}, tmp_path / "array.pth")
    with pytest.raises(CheckpointError, match="unsafe"):
        load_checkpoint(_tiny(), tmp_path / "array.pth")


def test_state_dict_in_released_format_prefixes_every_key_with_module():
    model = _tiny()
    released = state_dict_in_released_format(model)
    assert list(released) == ["module." + k for k in model.state_dict()]
    assert list(state_dict_in_released_format(nn.DataParallel(model))) == list(released)


def test_save_checkpoint_writes_released_format_that_loads_back(tmp_path):
    source, target = _tiny(), _tiny()
    path = tmp_path / "model.pth"
    save_checkpoint(source, path, epoch=5)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"net", "epoch"} and raw["epoch"] == 5
    assert all(k.startswith("module.") for k in raw["net"])
    load_checkpoint(target, path)
    assert _same_weights(source, target)
    assert os.listdir(tmp_path) == ["model.pth"]  # no temporary file left behind


def test_failed_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.pth"
    save_checkpoint(_tiny(), path, epoch=1)
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(_tiny(), path, epoch=lambda: None)  # a lambda cannot be pickled
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.pth"]
