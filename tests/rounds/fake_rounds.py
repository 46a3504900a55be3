"""Fake rounds for the tests: a ``run_round`` that records when it ran, and a script that runs a
``RoundManager`` in a second process.

    python tests/rounds/fake_rounds.py run STATE RECORD --sleep S --triggers K --gap G
        K triggers (wait=True), G seconds apart, each round sleeping S; prints each trigger's answer
    python tests/rounds/fake_rounds.py hang STATE
        start a round whose run_round sleeps for a minute (to be killed)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lib.rounds import RoundManager  # noqa: E402
from lib.stopping import install_stop_handlers  # noqa: E402


class Recorder:
    """``run_round`` stand-in: sleeps ``sleep`` s and appends {round, pid, start, end} as one JSON line
    to ``record`` (one O_APPEND write per round, so processes can share the file).

    Returns fields like the real round: Dice for two backbones, publication, re-scored count, top."""

    def __init__(self, record: str, sleep: float = 0.0, fail_rounds=()):
        self.record = record
        self.sleep = sleep
        self.fail_rounds = set(fail_rounds)

    def __call__(self, entry):
        start = time.time()
        time.sleep(self.sleep)
        end = time.time()
        line = json.dumps({"round": entry["round"], "pid": os.getpid(), "start": start, "end": end}) + "\n"
        fd = os.open(self.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        if entry["round"] in self.fail_rounds:
            raise RuntimeError(f"out of memory in round {entry['round']}")
        n = entry["round"]
        return {
            "dice": {
                "unet": {"liver": 0.5 + 0.01 * n, "spleen": 0.4 + 0.01 * n},
                "segresnet": {"liver": 0.6, "spleen": 0.5},
            },
            "published": {"unet": {"file": "unet_finetuned.pth", "version": f"v{n}"}},
            "rescored": 10 + n,
            "top": [{"id": f"img_{n:02d}", "score": 0.9}, {"id": "img_99", "score": 0.1}],
        }


def read_records(record: str):
    """The recorded rounds, sorted by start time."""
    if not os.path.exists(record):
        return []
    with open(record) as f:
        return sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r["start"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["run", "hang"])
    p.add_argument("state")
    p.add_argument("record", nargs="?", default=os.devnull)
    p.add_argument("--sleep", type=float, default=0.2)
    p.add_argument("--triggers", type=int, default=1)
    p.add_argument("--gap", type=float, default=0.0)
    a = p.parse_args()
    if a.mode == "hang":
        install_stop_handlers()  # as the app does in every process: SIGTERM unwinds, the round is logged
        m = RoundManager(a.state, Recorder(a.record, sleep=60), list_labels=lambda: ["a", "b"]).start()
        print(m.trigger("hang", wait=True), flush=True)
        return
    m = RoundManager(a.state, Recorder(a.record, sleep=a.sleep), list_labels=lambda: ["a", "b"]).start()
    for _ in range(a.triggers):
        print(m.trigger("other-process", wait=True), flush=True)
        time.sleep(a.gap)


if __name__ == "__main__":
    main()
