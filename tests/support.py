"""Test helpers: where the shared data is, a stand-in model hub; the server process and synthetic weights
from ``testing`` (shared with bench/)."""

from __future__ import annotations

import os
import shutil
from typing import Dict, Optional

import pytest

from testing.server import BIN, REPO, Server, free_port  # noqa: F401
from testing.synthetic_weights import synthetic_registry, write_synthetic_checkpoint  # noqa: F401

SHARED = os.path.join(os.path.dirname(REPO), "shared")
TOTALSEG = os.path.join(SHARED, "data", "totalseg-example")


def shared_path(*parts: str) -> str:
    """Path under ../shared; the test is skipped (with the reason) where it is absent."""
    p = os.path.join(SHARED, *parts)
    if not os.path.exists(p):
        pytest.skip(f"shared data not found: {p}")
    return p


def tiny_studies(tmp_path, n: int = 3):
    """``n`` air-filled 16x16x12 CTs (im0, im1, ...) in ``tmp_path/studies`` and a liver label for them:
    (studies folder, label file)."""
    import nibabel as nib
    import numpy as np

    from lib.classes import CLASS_INDEX

    studies = tmp_path / "studies"
    studies.mkdir()
    affine = np.diag([3.0, 3.0, 4.0, 1.0])
    for i in range(n):
        nib.save(nib.Nifti1Image(np.full((16, 16, 12), -1000, np.int16), affine), str(studies / f"im{i}.nii.gz"))
    label = np.zeros((16, 16, 12), np.uint8)
    label[4:10, 4:10, 3:8] = CLASS_INDEX["liver"]
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "label.nii.gz"))
    return studies, str(tmp_path / "label.nii.gz")


def copy_into(src: str, dst_dir: str, name: Optional[str] = None) -> str:
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, name or os.path.basename(src))
    shutil.copyfile(src, dst)
    return dst




class FileServer:
    """A tiny HTTP server on 127.0.0.1 standing in for the model hub.

    ``routes[path] = (body, announced_length)``; an announced length larger than the body makes a
    truncated download; unknown paths answer 404.
    """

    def __init__(self, routes: Dict[str, tuple]):
        import http.server
        import threading

        self.routes = routes
        self.hits: list = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                outer.hits.append(self.path)
                if self.path not in outer.routes:
                    self.send_error(404, "not found")
                    return
                body, length = outer.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length if length is not None else len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def hub_path(filename: str) -> str:
    from lib.weights.registry import HF_REPO

    return f"/{HF_REPO}/resolve/main/{filename}"
