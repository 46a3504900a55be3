"""A real ``monailabel start_server`` process of this app on a loopback port (tests and benchmarks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Dict, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real ``monailabel start_server`` process on a loopback port, with its log kept for failures."""

    def __init__(self, studies: str, conf: Dict[str, str], workdir: str, app: Optional[str] = None, env=None):
        self.port = free_port()
        self.conf = dict(conf)
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
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # children too (background train/scoring processes)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
