"""Stopping on SIGINT / SIGTERM: one stop flag per process, signal handlers chained to the ones before,
and the processes this one started ended (terminated, then killed after a grace period).

Long loops look at ``stop_requested()`` between steps (volumes, backbones) and end early; code that must
not be cut in the middle (a file written in place) runs inside ``uninterrupted()``: a signal that arrives
meanwhile takes effect when the block ends. Where nothing else handles SIGTERM (Python's default kills the
process on the spot) it raises ``StopRequested`` instead, so ``finally`` blocks, the round log and
``atexit`` handlers (Ray's shutdown) still run.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(KeyboardInterrupt):
    """The process was asked to stop (a signal): raised where work has to end early. A KeyboardInterrupt,
    so ``except Exception`` blocks let it through as they let Ctrl-C through."""


class _State:
    def __init__(self):
        self.event = threading.Event()
        self.reason = ""
        self.callbacks: List[Callable[[int], None]] = []
        self.installed: Dict[int, object] = {}  # signal -> the handler before ours
        self.depth = 0  # uninterrupted() blocks open in the main thread
        self.deferred: Optional[tuple] = None  # (previous handler, signal) held back by uninterrupted()
        self.signum = 0  # the signal that stopped the process


_state = _State()


def request_stop(reason: str) -> None:
    """Ask this process to stop (the first reason is kept)."""
    if not _state.event.is_set():
        _state.reason = reason
        _state.event.set()
        logger.warning(f"stopping: {reason}")


def stop_requested() -> bool:
    return _state.event.is_set()


def stop_reason() -> str:
    return _state.reason


def check_stop(what: str = "") -> None:
    """Raise ``StopRequested`` when a stop was asked for (``what``: the step that is not started)."""
    if _state.event.is_set():
        raise StopRequested(f"{_state.reason}{': ' + what if what else ''}")


def on_stop(callback: Callable[[int], None]) -> None:
    """Run ``callback(signum)`` on the first stop signal (after ``install_stop_handlers``), in the main
    thread, before the handler that was there before ours."""
    _state.callbacks.append(callback)


def install_stop_handlers(signals=STOP_SIGNALS) -> bool:
    """Handle ``signals`` in this process: request the stop, run the ``on_stop`` callbacks (first signal
    only), then do what the previous handler did (uvicorn's graceful shutdown, Python's KeyboardInterrupt);
    a default SIGTERM raises ``StopRequested``. Idempotent; only the main thread can install handlers
    (False elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if not _state.installed:
        atexit.register(_exit_without_teardown)
        sys.excepthook = _short_for_stops(sys.excepthook)
    for sig in signals:
        if sig not in _state.installed:
            _state.installed[sig] = signal.getsignal(sig)
            signal.signal(sig, _handle)
    return True


def reinstall_stop_handlers() -> None:
    """Put this module's handlers back where a library replaced them (``ray.init`` sets its own SIGTERM
    handler); main thread only, and only those ``install_stop_handlers`` installed."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _state.installed:
        if signal.getsignal(sig) is not _handle:
            signal.signal(sig, _handle)


def _short_for_stops(excepthook):
    """An uncaught ``StopRequested`` is the end asked for, not an error: one line instead of a traceback."""

    def hook(kind, value, tb):
        if issubclass(kind, StopRequested):
            print(f"stopped ({value})", file=sys.stderr)
        else:
            excepthook(kind, value, tb)

    return hook


def _exit_without_teardown() -> None:
    """At exit after a stop signal, once the ``atexit`` handlers registered after ours have run (Ray's
    shutdown): end the process without Python's teardown, which garbage-collects torch and MONAI objects
    for seconds, past the grace period a stopping server gives its subprocesses. The work is stored."""
    if not _state.signum:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(128 + _state.signum)


def _handle(signum, frame) -> None:
    first = not _state.event.is_set()
    _state.signum = _state.signum or signum
    request_stop(f"signal {signal.Signals(signum).name}")
    if first:
        for callback in list(_state.callbacks):
            try:
                callback(signum)
            except Exception:
                logger.exception("stopping: a stop callback failed")
    previous = _state.installed.get(signum)
    if _state.depth > 0:
        _state.deferred = (previous, signum)
        return
    _chain(previous, signum, frame)


def _chain(previous, signum, frame) -> None:
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        raise StopRequested(f"signal {signal.Signals(signum).name}")


@contextmanager
def uninterrupted() -> Iterator[None]:
    """A block a stop signal must not cut in two (in the main thread, where Python runs signal handlers):
    the signal's effect (an exception) comes when the block has ended."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        _state.depth += 1
    try:
        yield
    finally:
        if main:
            _state.depth -= 1
    if main and _state.depth == 0 and _state.deferred is not None:
        (previous, signum), _state.deferred = _state.deferred, None
        _chain(previous, signum, None)


def end_child_processes(grace_s: float = 5.0, busy: Optional[Callable[[], bool]] = None) -> List[int]:
    """End every process this one started, and theirs: SIGTERM to each, SIGKILL to those still alive after
    ``grace_s`` seconds. Children that appear meanwhile are ended too; the sweep goes on while ``busy()``
    says something may still start one (at most ``grace_s`` + 2 s in all). Returns the pids signalled."""
    import psutil

    me = psutil.Process()
    seen: Dict[int, "psutil.Process"] = {}
    start = time.monotonic()
    kill_at, give_up = start + grace_s, start + grace_s + 2.0
    while True:
        now = time.monotonic()
        sig = signal.SIGKILL if now >= kill_at else signal.SIGTERM
        for p in _descendants(me):
            if p.pid not in seen:
                seen[p.pid] = p
                _send(p, sig)
        alive = [p for p in seen.values() if _alive(p)]
        if now >= kill_at:
            for p in alive:
                _send(p, signal.SIGKILL)
        if (not alive and not (busy and busy())) or now >= give_up:
            break
        time.sleep(0.05)
    if seen:
        left = [p.pid for p in seen.values() if _alive(p)]
        logger.warning(f"stopping: ended {len(seen)} child processes" + (f"; still alive: {left}" if left else ""))
    return sorted(seen)


def _descendants(proc) -> list:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _send(proc, sig) -> None:
    import psutil

    try:
        if _alive(proc):
            proc.send_signal(sig)
            if sig == signal.SIGTERM:
                logger.info(f"stopping: SIGTERM to {proc.pid} ({_name(proc)})")
    except psutil.Error:
        pass


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _name(proc) -> str:
    try:
        return " ".join(proc.cmdline()[:6])[:160]
    except Exception:
        return "?"

