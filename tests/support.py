"""Shared test fixtures: where the shared data is, synthetic checkpoints, and real server processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Dict, Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
TOTALSEG = os.path.join(SHARED, "data", "totalseg-example")
BIN = os.path.dirname(sys.executable)


def shared_path(*parts: str) -> str:
    """Path under ../shared; the test is skipped (with the reason) where it is absent."""
    p = os.path.join(SHARED, *parts)
    if not os.path.exists(p):
        pytest.skip(f"shared data not found: {p}")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_synthetic_checkpoint(backbone: str, path: str, seed: int = 0) -> str:
    """A checkpoint in the released format ({"net": {"module.*": ...}}) with synthetic weights."""
    import torch

    from lib.networks.synthetic import synthetic_released_state_dict

    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"net": synthetic_released_state_dict(backbone, seed=seed), "epoch": 2100}, path)
    return path


def synthetic_registry(folder, backbone: str = "segresnet"):
    """A WeightsRegistry under ``folder`` serving a synthetic checkpoint in the released format."""
    from lib.app import validate_checkpoint
    from lib.weights import RELEASED_FILES, WeightsRegistry

    weights = os.path.join(str(folder), "weights")
    write_synthetic_checkpoint(backbone, os.path.join(weights, RELEASED_FILES[backbone]))
    reg = WeightsRegistry(
        os.path.join(str(folder), "model"), validate_checkpoint, weights_dir=weights, use_pretrained_model=False
    )
    reg.resolve(backbone)
    return reg


class Server:
    """A real ``monailabel start_server`` process on a loopback port, with its log kept for failures."""

    def __init__(self, studies: str, conf: Dict[str, str], workdir: str, app: Optional[str] = None, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, f"server-{self.port}.log")
        cmd = [
            os.path.join(BIN, "monailabel"),
            "start_server",
            "--app",
            app or os.path.join(REPO, "apps", "suprem"),
            "--studies",
            studies,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        for k, v in conf.items():
            cmd += ["--conf", k, str(v)]
        e = dict(os.environ)
        e.update(
            {
                "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
                "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false",
                "HF_ENDPOINT": e.get("HF_ENDPOINT_TEST", "http://127.0.0.1:9"),  # never the internet
                "PYTHONUNBUFFERED": "1",
                # MONAI Label's launcher runs `python -m monailabel.main`: the venv's python, not PATH's.
                "MONAILABEL_PYEXE": sys.executable,
                "PATH": BIN + os.pathsep + e.get("PATH", ""),
            }
        )
        e.update(env or {})
        self._log = open(self.log_path, "w")
        # A session of its own, so kill() takes the server and every child (background train/scoring) down.
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=e, cwd=workdir, start_new_session=True
        )

    def wait_ready(self, timeout: float = 240.0) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/info/", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def info(self) -> Dict:
        with urllib.request.urlopen(self.url + "/info/", timeout=30) as r:
            return json.load(r)

    def log_tail(self, n: int = 80) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def kill(self):
        """SIGKILL the server and its children, as a crash or an OOM killer would."""
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)  # children too (background train/scoring processes)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


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
