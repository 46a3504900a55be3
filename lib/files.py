"""Files written whole or not at all, and what identifies a file's content.

Every file the app writes that someone else may read meanwhile (models, sidecars, logs, records,
studies, CSVs, plots) goes through ``atomic_path``: it is written under a temporary name in the
same folder, flushed to disk, then renamed over the target, so a reader sees the old file or the
new one, never half of one, and a failed write leaves the old file as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from typing import Any, Dict, IO, Iterator


@contextmanager
def atomic_path(path: "str | os.PathLike[str]") -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block ends without error, flush it to disk and
    rename it over ``path``; on any error, remove it and leave ``path`` untouched.

    The temporary name starts with a dot and ends in ``.tmp``, so a folder watcher that looks for
    studies (``*.nii.gz``) or models (``*.pth``) never picks it up. The file gets the usual
    permissions (umask), as a plain write would.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_open(path: "str | os.PathLike[str]", mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` through ``atomic_path``: the file appears whole when the block ends."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f


def write_json_atomic(path: "str | os.PathLike[str]", data: Any) -> None:
    """Write ``data`` as indented JSON (keys sorted; unknown types as strings) through ``atomic_path``."""
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)


def read_json(path: "str | os.PathLike[str]", default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _fsync(path: str) -> None:
    if os.path.isfile(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_versions: Dict = {}


def file_version(path: "str | os.PathLike[str]") -> str:
    """Short content hash (12 hex digits) of a file, cached by path, size and modification time: the
    version of a model file that produced a score, a label or a round."""
    path = os.fspath(path)
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _versions:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _versions[key] = digest.hexdigest()[:12]
    return _versions[key]


def file_stamp(path: "str | os.PathLike[str]") -> Dict[str, int]:
    """``{"size", "mtime_ns"}`` of a file (``{}`` if it cannot be read): a record made from this stamp is
    stale once the file is replaced."""
    try:
        st = os.stat(path)
    except OSError:
        return {}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
