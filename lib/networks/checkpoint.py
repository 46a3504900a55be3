"""Reading and writing checkpoints in the released SuPreM format.

Released files are ``torch.save``d dicts ``{"net": state_dict, ...}`` (optionally also
``optimizer``, ``scheduler``, ``epoch``) whose state-dict keys carry the ``module.`` prefix that
``nn.DataParallel`` adds. A ``.pth`` is a pickle, and a pickle can run code when it is read, so
files are only ever read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from lib.files import atomic_open

PREFIX = "module."
_MAX_KEYS_IN_MESSAGE = 5


class CheckpointError(ValueError):
    """A checkpoint file cannot be read safely, or its weights do not fit the model."""


def _numpy_scalar_globals() -> List[Any]:
    """The globals needed to unpickle numeric numpy scalars (e.g. ``epoch`` as ``numpy.int64``).

    Training scripts sometimes store counters as numpy scalars. Rebuilding one needs the numpy
    scalar constructor and the dtype classes; none of them can run arbitrary code. Pickles written
    under numpy 1 and numpy 2 name the scalar constructor differently, so both names are allowed.
    Arrays (``numpy.core.multiarray._reconstruct``) and object dtypes stay refused.
    """
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed: List[Any] = [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
    ]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles dtypes by their class
    if dtypes is not None:
        for name in (
            "BoolDType",
            "Int8DType", "Int16DType", "Int32DType", "Int64DType",
            "UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType",
            "Float16DType", "Float32DType", "Float64DType",
        ):
            cls = getattr(dtypes, name, None)
            if cls is not None:
                allowed.append(cls)
    return allowed


def _unwrap(model: nn.Module) -> nn.Module:
    """The network inside a (Distributed)DataParallel wrapper, whose own keys lack ``module.``."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def _first(keys: List[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_IN_MESSAGE])
    more = len(keys) - _MAX_KEYS_IN_MESSAGE
    return shown + (f" (and {more} more)" if more > 0 else "")


def _read(path: str) -> Any:
    """``torch.load`` restricted to tensors, containers, primitives and numpy scalars."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (empty file)")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        # weights_only checks each global against its allow-list before importing or calling it,
        # so naming one here means the pickle asked for an arbitrary callable (os.system, ...).
        refused = [line.strip() for line in text.splitlines() if "GLOBAL" in line]
        if refused:
            raise CheckpointError(
                f"{path}: refused as unsafe: the file asks to load Python objects outside the "
                f"weights-only allow-list, which could run code. Treat it as untrusted; it was not "
                f"executed. ({refused[0].split('. ')[0][:300]})"
            ) from exc
        if _starts_like_pickle(path):
            raise CheckpointError(
                f"{path}: refused as untrusted: a raw pickle, not a torch checkpoint, that the "
                f"weights-only loader cannot read safely (unpickling it normally could run code); "
                f"it was not executed. ({_short(exc)})"
            ) from exc
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_short(exc)})") from exc
    except Exception as exc:  # truncated zip, garbage, HTML error page, empty file, ...
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_short(exc)})") from exc


def _starts_like_pickle(path: str) -> bool:
    """True if the file begins with a pickle PROTO opcode (protocol 2 or later)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL


def _short(exc: BaseException) -> str:
    """The informative line of a loader error (torch's weights-only errors open with boilerplate)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            lines = [rest] if rest else lines[i + 1 : i + 2]
            break
    detail = lines[0].split(". ")[0] if lines else "no details"
    return f"{type(exc).__name__}: {detail}"[:300]


def _extract_state_dict(obj: Any, path: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "net" in obj and isinstance(obj["net"], Mapping):
        state = obj["net"]
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        found = f"a dict with keys {_first(sorted(map(str, obj)))}" if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: expected {{'net': state_dict, ...}} or a bare state dict, found {found}")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {_first(bad)}")
    # Released files carry DataParallel's prefix on every key; strip it only when all keys have it,
    # so a half-prefixed dict shows up as missing/unexpected keys instead of being silently merged.
    if state and all(k.startswith(PREFIX) for k in state):
        return {k[len(PREFIX):]: v for k, v in state.items()}
    return dict(state)


def load_checkpoint(model: nn.Module, path: "str | os.PathLike[str]") -> nn.Module:
    """Load a released-format checkpoint into ``model`` in place and return ``model``.

    Args:
        model: the network from ``build_network`` (or a wrapper exposing ``.module``).
        path: a ``.pth`` holding ``{"net": state_dict, ...}`` or a bare state dict; keys may carry
            the ``module.`` prefix.

    Every model key must be in the file, every key in the file must be used and every shape must
    match; otherwise nothing is loaded and ``CheckpointError`` names the file and the first
    offending keys. Values are cast to the model's dtypes (float weights, integer buffers).

    Raises:
        CheckpointError: unreadable or truncated file, a pickle that would run code (refused by
            the weights-only loader, never executed), or weights that do not fit the model.
    """
    path = os.fspath(path)
    target = _unwrap(model)
    state = _extract_state_dict(_read(path), path)
    expected = target.state_dict()

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = [
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if mismatched:
        shown = [f"{k} (file {list(a)} vs model {list(b)})" for k, a, b in mismatched]
        problems.append(f"{len(mismatched)} shape mismatch(es): {_first(shown)}")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not fit the model: " + "; ".join(problems))

    target.load_state_dict(state, strict=True)
    return model


def state_dict_in_released_format(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state dict with every key prefixed ``module.``, as in the released files."""
    return {PREFIX + k: v for k, v in _unwrap(model).state_dict().items()}


def save_checkpoint(model: nn.Module, path: "str | os.PathLike[str]", **extra: Any) -> None:
    """Write ``{"net": state_dict_in_released_format(model), **extra}`` to ``path`` atomically.

    The file is written to a temporary name in the same folder and then renamed over ``path``, so
    a reader never sees a half-written checkpoint (the rename is atomic on one filesystem).
    ``extra`` (e.g. ``epoch=3``) must hold only what a weights-only load accepts: tensors,
    containers and Python primitives.
    """
    path = os.fspath(path)
    if "net" in extra:
        raise ValueError("'net' is written from the model; pass other entries only")
    payload = {"net": state_dict_in_released_format(model), **extra}
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)
