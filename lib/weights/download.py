"""Download a released SuPreM checkpoint: progress bar, atomic write, validated before it is kept."""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from typing import Callable, Optional

from lib.files import atomic_path

logger = logging.getLogger(__name__)

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """The file could not be fetched, or what was fetched is not the expected checkpoint."""


def _progress(total: Optional[int], desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, mininterval=1.0)
    except ImportError:  # pragma: no cover - tqdm ships with monai's dependencies
        return None


def download_file(url: str, dest: str, validate: Callable[[str], None], timeout: float = 30.0) -> str:
    """Fetch ``url`` into ``dest`` atomically; ``validate(tmp_path)`` must pass before the rename.

    The file is streamed to a temporary name in ``dest``'s folder; a short read (fewer bytes than the
    server announced), an HTTP error or a failed validation removes it and raises DownloadError, so
    ``dest`` is either absent or a complete, validated file.
    """
    with atomic_path(dest) as tmp:
        try:
            received, total = _fetch(url, tmp, os.path.basename(dest), timeout)
        except urllib.error.HTTPError as e:
            raise DownloadError(f"{url} answered HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise DownloadError(f"could not download {url}: {reason}") from e
        if total is not None and received != total:
            raise DownloadError(f"download of {url} was truncated: {received} of {total} bytes")
        try:
            validate(tmp)
        except Exception as e:
            raise DownloadError(f"{url} is not a valid checkpoint: {e}") from e
    return dest


def _fetch(url: str, dest: str, desc: str, timeout: float):
    """Stream ``url`` into ``dest`` with a progress bar; (bytes received, bytes announced or None)."""
    req = urllib.request.Request(url, headers={"User-Agent": "suprem-monailabel"})
    with urllib.request.urlopen(req, timeout=timeout) as resp, open(dest, "wb") as out:
        total = resp.headers.get("Content-Length")
        total = int(total) if total is not None else None
        bar = _progress(total, desc)
        received = 0
        for chunk in iter(lambda: resp.read(CHUNK), b""):
            out.write(chunk)
            received += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    return received, total


def hf_url(endpoint: str, repo: str, filename: str, revision: str = "main") -> str:
    """The hub's plain download address of ``filename`` in model repository ``repo``."""
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{revision}/{filename}"


def download_released(filename: str, dest: str, endpoint: str, repo: str, validate: Callable[[str], None]) -> str:
    """Download one released file of ``repo`` from the hub at ``endpoint`` into ``dest``."""
    url = hf_url(endpoint, repo, filename)
    logger.info(f"Downloading {filename} from {url}")
    return download_file(url, dest, validate)
