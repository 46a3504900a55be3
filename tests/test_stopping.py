"""lib/stopping: a stop signal is held back by ``uninterrupted()``, chained to the handler before it, and a
stopping process ends the processes it started. Each case runs in a process of its own (the stop flag
and the signal handlers belong to a process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_sigterm_inside_an_uninterrupted_block_takes_effect_when_the_block_ends():
    got = _run(
        """
        import os, signal
        from lib.stopping import install_stop_handlers, stop_requested, uninterrupted
        install_stop_handlers()
        with uninterrupted():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # plenty of bytecodes where Python would run the handler
                pass
            print("block finished", stop_requested(), flush=True)
        print("after the block", flush=True)
        """
    )
    assert got.stdout.splitlines() == ["block finished True"], got
    assert got.returncode == 128 + signal.SIGTERM, got
    assert "stopped (signal SIGTERM)" in got.stderr and "Traceback" not in got.stderr, got.stderr


def test_a_stop_signal_runs_the_callbacks_then_the_handler_that_was_there_before():
    got = _run(
        """
        import os, signal
        from lib.stopping import install_stop_handlers, on_stop
        signal.signal(signal.SIGINT, lambda s, f: print("previous handler", flush=True))
        install_stop_handlers()
        on_stop(lambda s: print("callback", signal.Signals(s).name, flush=True))
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the callbacks run once; the previous handler each time
        print("still running", flush=True)
        """
    )
    assert got.stdout.splitlines() == ["callback SIGINT", "previous handler", "previous handler", "still running"], got


def test_ending_child_processes_terminates_then_kills_those_that_ignore_sigterm():
    got = _run(
        """
        import subprocess, sys, time
        from lib.stopping import end_child_processes
        polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        stubborn = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
        assert stubborn.stdout.readline().strip() == "ready"
        ended = end_child_processes(grace_s=1.0)
        print(sorted(ended) == sorted([polite.pid, stubborn.pid]), polite.wait(5), stubborn.wait(5), flush=True)
        """
    )
    assert got.stdout.split() == ["True", str(-signal.SIGTERM), str(-signal.SIGKILL)], got
