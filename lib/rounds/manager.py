"""Runs active-learning rounds one at a time, across every process that shares one state folder.

A round (train on all final labels, publish, re-score, re-rank) is the caller's ``run_round``; this
module decides when it runs, makes sure two never overlap and records each one in the round log.

Files in ``state_dir``:

- ``rounds.json``: the round log (``RoundLog``);
- ``round.lock``: ``flock``-ed exclusively by whoever runs a round, shared for a moment by whoever
  only looks (``busy``, ``/info/``). MONAI Label runs train requests in a subprocess of the server,
  so the server and that subprocess both trigger rounds;
- ``round.pending``: "one more round when this one ends" (text: the trigger that asked). A trigger
  that finds the lock held creates it; the runner removes it when it starts the next round, so any
  number of triggers during a round make exactly one more round;
- ``labels_since_round.json``: final labels saved since the last round started (survives restarts).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

from lib.rounds.lock import FileLock, acquire_runner, is_locked
from lib.rounds.log import INTERRUPTED, RoundLog
from lib.files import write_json_atomic
from lib.stopping import stop_reason, stop_requested, uninterrupted

logger = logging.getLogger(__name__)

LOG_FILE = "rounds.json"
LOCK_FILE = "round.lock"
PENDING_FILE = "round.pending"
COUNTER_FILE = "labels_since_round.json"
COUNTER_LOCK = "labels.lock"

STARTED, QUEUED, ALREADY_QUEUED, SKIPPED = "started", "queued", "already queued", "skipped"


class RoundError(Exception):
    """Raised by ``run_round`` to fail a round but still record what it did (``fields``, e.g. the
    backbones already published)."""

    def __init__(self, message: str, fields: Optional[Dict] = None):
        super().__init__(message)
        self.fields = dict(fields or {})


def mean_dice(dice: Dict[str, Dict[str, Optional[float]]]) -> Dict[str, Optional[float]]:
    """{backbone: {organ: dice}} -> {backbone: mean over organs} (None and NaN values left out)."""
    out = {}
    for backbone, organs in (dice or {}).items():
        values = [float(v) for v in (organs or {}).values() if v is not None and not math.isnan(float(v))]
        out[backbone] = round(sum(values) / len(values), 4) if values else None
    return out


class RoundManager:
    """Triggers, queues and records rounds.

    ``run_round(entry) -> fields``: does the work of one round. ``entry`` is the new log entry
    (``round``, ``trigger``, ``label_ids``...); the returned dict is stored in the entry (``dice``,
    ``published``, ``rescored``, ``top``...; ``mean_dice`` is computed from ``dice`` when missing).
    If it raises, the round is logged ``failed`` with the message and the next trigger runs normally.

    ``list_labels() -> ids``: the final labels in the datastore now. It decides whether a round can
    run (no labels: skipped with a log line) and what ``labels_used`` says; without it every trigger
    runs ``run_round`` and ``labels_used`` is None unless ``run_round`` returns it.

    ``every_labels`` > 0: ``label_saved`` triggers a round after that many new final labels.
    ``interval_s`` > 0: after ``start()``, a timer triggers a round that often, but only when the final
    labels changed since the last successful round (an unchanged datastore would only retrain on the
    same data).

    ``requeue_interrupted``: ``start()`` runs the last round again when it was interrupted (the server
    stopped or died while it ran) and the final labels now differ from the last successful round's.

    When the process is stopping (``lib.stopping``) no round starts, and a round cut short by the stop is
    logged ``interrupted``: ``interrupt()`` marks the one running in this process at once.

    ``off``: why rounds are off (e.g. MONAI Label's train tasks are switched off), None when they are on.
    Off, no trigger runs a round (none of the above does), labels are still counted and the log still read.
    """

    def __init__(
        self,
        state_dir: str,
        run_round: Callable[[Dict], Optional[Dict]],
        every_labels: int = 0,
        interval_s: float = 0,
        list_labels: Optional[Callable[[], Sequence[str]]] = None,
        requeue_interrupted: bool = False,
        off: Optional[str] = None,
    ):
        self.off = off
        self.state_dir = os.path.abspath(state_dir)
        os.makedirs(self.state_dir, exist_ok=True)
        self.run_round = run_round
        self.every_labels = int(every_labels or 0)
        self.interval_s = float(interval_s or 0)
        self.list_labels = list_labels
        self.requeue_interrupted = requeue_interrupted
        self.lock_path = os.path.join(self.state_dir, LOCK_FILE)
        self.pending_path = os.path.join(self.state_dir, PENDING_FILE)
        self.counter_path = os.path.join(self.state_dir, COUNTER_FILE)
        self.counter_lock = os.path.join(self.state_dir, COUNTER_LOCK)
        self.log = RoundLog(os.path.join(self.state_dir, LOG_FILE), round_lock=self.lock_path)
        self._stop = threading.Event()
        self._timer: Optional[threading.Thread] = None
        self._runners: List[threading.Thread] = []
        self._runners_guard = threading.Lock()
        self._running: Optional[int] = None  # the round this process runs now

    # --- life cycle ---------------------------------------------------------------------------------
    def start(self) -> "RoundManager":
        """Mark rounds left running by a dead process as interrupted and start the interval timer
        (if ``interval_s`` > 0).

        A ``round.pending`` left by a dead process is not run now: the next round consumes it. (Removing
        it here could also remove a live queue: a runner elsewhere may be between its release of the
        lock and its last look at the queue.)
        """
        if not self.log.mark_interrupted() and self.busy():
            logger.info("rounds: a round is running in another process; its entry is left as it is")
        if self.off:
            logger.info(f"rounds: off ({self.off}); no round runs, interrupted ones included")
            return self
        if self.interval_s > 0 and self._timer is None:
            self._stop.clear()
            self._timer = threading.Thread(target=self._interval_loop, name="round-interval", daemon=True)
            self._timer.start()
            logger.info(f"rounds: a round every {self.interval_s:g} s when the final labels changed")
        if self.requeue_interrupted:
            self._requeue_interrupted()
        return self

    def _requeue_interrupted(self) -> Optional[str]:
        """Run the last round again if it was interrupted and its labels are still new (not all trained on
        by a successful round: the final labels now differ from the last successful round's)."""
        entries = self.log.entries()
        if not entries or entries[-1].get("status") != INTERRUPTED:
            return None
        n, done, labels = entries[-1].get("round"), self.log.last_done(), self._labels()
        if done is not None and labels is not None and sorted(labels) == sorted(done.get("label_ids") or []):
            logger.info(f"rounds: round {n} was interrupted; round {done['round']} trained on the same labels")
            return None
        logger.info(f"rounds: round {n} was interrupted; running it again")
        return self.trigger(f"resumed round {n}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the interval timer. A round already running goes on (its thread is a daemon)."""
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout)
            self._timer = None

    def interrupt(self, reason: str) -> Optional[int]:
        """The process is stopping: stop the timer and mark the round it runs now (if any) interrupted,
        before its daemon thread dies with the process. Returns that round's number."""
        self.stop(timeout=0)
        n = self._running
        if n is not None:
            self.log.interrupt(n, reason)
        return n

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the rounds this process runs in the background; True when none is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._runners_guard:
                self._runners = [t for t in self._runners if t.is_alive()]
                runners = list(self._runners)
            if not runners:
                return True
            for t in runners:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                t.join(left)
            if deadline is not None and time.monotonic() >= deadline:
                with self._runners_guard:
                    return not any(t.is_alive() for t in self._runners)

    def busy(self) -> bool:
        """Whether a round is running now, in this process or another one."""
        return is_locked(self.lock_path)

    def info(self) -> Dict:
        """For ``/info/``: current round, last round's summary, count, queue and trigger settings."""
        busy = self.busy()
        return {
            **self.log.summary(),
            "busy": busy,
            "queued": busy and os.path.exists(self.pending_path),
            "labels_since_round": len(self._read_counter()["ids"]),
            "every_labels": self.every_labels,
            "interval_s": self.interval_s,
            "off": self.off,
        }

    # --- triggers -----------------------------------------------------------------------------------
    def trigger(self, reason: str, wait: bool = False) -> str:
        """Ask for a round. Returns "started" (this call runs it: in a daemon thread, or before returning
        when ``wait``), "queued" / "already queued" (a round is running; one more follows it) or
        "skipped" (there are no final labels, rounds are off, or the process is stopping)."""
        if self.off:
            logger.info(f"round ({reason}) not started: rounds are off ({self.off})")
            return SKIPPED
        if stop_requested():
            logger.info(f"round ({reason}) not started: {stop_reason()}")
            return SKIPPED
        labels = self._labels()
        if labels is not None and not labels:
            logger.warning(f"round ({reason}) skipped: there are no final labels to train on")
            return SKIPPED
        lock = FileLock(self.lock_path)
        if not acquire_runner(lock):
            status = self._queue(reason)
            # The runner may have released the lock after its last look at the queue: try again, and
            # if the lock is free now this call runs the queued round itself.
            if not acquire_runner(lock):
                logger.info(f"round ({reason}) {status}: a round is running")
                return status
        if wait:
            self._run_rounds(lock, reason)
            return STARTED
        t = threading.Thread(target=self._run_rounds, args=(lock, reason), name="round", daemon=True)
        with self._runners_guard:
            self._runners.append(t)
        try:
            t.start()
        except BaseException:
            lock.release()
            raise
        return STARTED

    def label_saved(self, image_id: str) -> Optional[str]:
        """Count a new final label of ``image_id`` (saving one image again counts once) and trigger a
        round when ``every_labels`` of them arrived since the last round started. Returns the trigger's
        answer, or None when no round was asked for."""
        with FileLock(self.counter_lock):
            counter = self._read_counter()
            counter["seq"] += 1
            counter["ids"][str(image_id)] = counter["seq"]
            write_json_atomic(self.counter_path, counter)
        n = len(counter["ids"])
        if self.every_labels > 0 and n >= self.every_labels and not self.off:
            logger.info(f"rounds: {n} new final labels since the last round (every {self.every_labels})")
            return self.trigger("labels")
        return None

    def labels_since_round(self) -> List[str]:
        """Ids of the final labels saved since the last round started."""
        return sorted(self._read_counter()["ids"])

    # --- running --------------------------------------------------------------------------------------
    def _run_rounds(self, lock: FileLock, reason: str) -> None:
        """Holding ``lock``: run a round, then one more while a trigger queued one; release the lock."""
        try:
            while True:
                queued = self._take_pending()
                self._run_one(reason if reason is not None else (queued or "queued"))
                reason = None
                if stop_requested():  # a queued round stays queued for the next start
                    return
                if os.path.exists(self.pending_path):
                    continue
                lock.release()
                # A trigger can queue between our look and the release, then fail its second try
                # while we still held the lock: look once more now that it is free.
                if os.path.exists(self.pending_path) and acquire_runner(lock):
                    if os.path.exists(self.pending_path):
                        continue
                    lock.release()
                return
        except Exception:
            logger.exception("rounds: the round runner stopped on an error")
        finally:
            lock.release()

    def _run_one(self, reason: str) -> Optional[Dict]:
        snapshot = self._read_counter()["seq"]
        labels = self._labels()
        if labels is not None and not labels:
            logger.warning(f"round ({reason}) skipped: there are no final labels to train on")
            return None
        # We hold the round lock, so a "running" entry left in the log belongs to a dead process.
        self.log.interrupt_running()
        t0, n = time.monotonic(), None
        try:
            with uninterrupted():  # a stop signal while the entry is made lands below, its number known
                entry = self.log.start(reason, labels)
                n = self._running = entry["round"]
                self._reset_counter(snapshot)
            fields = dict(self.run_round(dict(entry)) or {})
        except Exception as e:
            if n is None:
                raise
            if stop_requested():  # cut short by the stop (a worker killed, a step refused), not failed
                return self.log.interrupt(n, f"{stop_reason()} while the round ran")
            if isinstance(e, RoundError):
                return self.log.fail(n, str(e), **{**e.fields, "seconds": round(time.monotonic() - t0, 2)})
            logger.exception(f"round {n} failed")  # the round fails, the server and the next rounds go on
            return self.log.fail(n, f"{type(e).__name__}: {e}", seconds=round(time.monotonic() - t0, 2))
        except BaseException as e:  # KeyboardInterrupt / SystemExit / a stop signal: record it, then go on
            if n is not None:
                self.log.interrupt(n, f"{stop_reason() or type(e).__name__} while the round ran")
            raise
        finally:
            self._running = None
        if stop_requested():  # the round's steps ended early (scoring stopped between volumes)
            return self.log.interrupt(n, f"{stop_reason()} while the round ran")
        if fields.get("dice") and not fields.get("mean_dice"):
            fields["mean_dice"] = mean_dice(fields["dice"])
        fields["seconds"] = round(time.monotonic() - t0, 2)
        return self.log.finish(n, **fields)

    def _interval_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                why = self._changed_since_last_round()
                if why:
                    logger.info(f"rounds: interval round ({why})")
                    self.trigger("interval")
                else:
                    logger.info("rounds: interval reached, final labels unchanged since the last round; skipped")
            except Exception:
                logger.exception("rounds: interval trigger failed")

    def _changed_since_last_round(self) -> Optional[str]:
        """Why an interval round is worth running, or None when the labels did not change."""
        if self._read_counter()["ids"]:
            return "new final labels saved"
        last = self.log.last_done()
        if last is None:
            return "no successful round yet"
        labels = self._labels()
        if labels is None:
            return "final labels unknown"
        if sorted(str(i) for i in labels) != sorted(last.get("label_ids") or []):
            return "final labels differ from the last round"
        return None

    # --- helpers --------------------------------------------------------------------------------------
    def _labels(self) -> Optional[List[str]]:
        if self.list_labels is None:
            return None
        return [str(i) for i in self.list_labels()]

    def _queue(self, reason: str) -> str:
        try:
            fd = os.open(self.pending_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return ALREADY_QUEUED
        with os.fdopen(fd, "w") as f:
            f.write(reason)
        return QUEUED

    def _take_pending(self) -> Optional[str]:
        """Remove the queue marker; returns the trigger that queued it (None when nothing was queued)."""
        try:
            with open(self.pending_path) as f:
                reason = f.read().strip()
            os.remove(self.pending_path)
        except FileNotFoundError:
            return None
        return reason or "queued"

    def _read_counter(self) -> Dict:
        try:
            with open(self.counter_path) as f:
                data = json.load(f)
            return {"seq": int(data.get("seq", 0)), "ids": dict(data.get("ids", {}))}
        except FileNotFoundError:
            return {"seq": 0, "ids": {}}
        except (OSError, ValueError, AttributeError) as e:
            logger.error(f"rounds: label counter {self.counter_path} unreadable ({e}); counting from 0")
            return {"seq": 0, "ids": {}}

    def _reset_counter(self, upto: int) -> None:
        """Forget the labels counted up to ``upto`` (the round covers them); later saves stay counted."""
        with FileLock(self.counter_lock):
            counter = self._read_counter()
            counter["ids"] = {k: s for k, s in counter["ids"].items() if s > upto}
            write_json_atomic(self.counter_path, counter)

