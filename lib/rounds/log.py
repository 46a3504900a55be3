"""The round log: one JSON file (a list of rounds) beside the datastore that survives restarts.

Every change is a read-modify-write under ``<log>.lock`` followed by an atomic replace of the file, so
readers (``/info/``, the history command, other processes) always see a whole, valid file, and two
writers never lose each other's change.

A round entry::

    {"round": 3, "status": "running" | "done" | "failed" | "interrupted",
     "pid": 1234, "trigger": "labels", "started_at": "2025-01-01T10:00:00+00:00",
     "labels_used": 12, "label_ids": [...],
     # when it ends:
     "ended_at": ..., "seconds": 61.2,
     "dice": {"unet": {"liver": 0.93, ...}}, "mean_dice": {"unet": 0.88},
     "published": {"unet": {"file": ".../unet_finetuned.pth", "version": "ab12cd34ef56"}},
     "rescored": 40, "top": [{"id": "img_07", "score": 0.71}, ...],
     "revised_images": {"liver": 12, ...},         # per organ: labels trained on with it revised
     "val_revised_images": {"liver": 3, ...},      # per organ: validation images its Dice is over
     "error": "..."}                               # failed / interrupted only
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime
from typing import Dict, List, Optional, Sequence

from lib.rounds.lock import FileLock, is_locked
from lib.files import write_json_atomic

logger = logging.getLogger(__name__)

RUNNING, DONE, FAILED, INTERRUPTED = "running", "done", "failed", "interrupted"
ENDED = (DONE, FAILED, INTERRUPTED)


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _seconds_since(iso: Optional[str]) -> Optional[float]:
    try:
        return round(time.time() - datetime.fromisoformat(iso).timestamp(), 1)
    except (TypeError, ValueError):
        return None


def compact(entry: Optional[Dict]) -> Optional[Dict]:
    """An entry without its label id list (which grows with the datastore): what ``/info/`` shows."""
    if entry is None:
        return None
    return {k: v for k, v in entry.items() if k != "label_ids"}


class RoundLog:
    """Rounds of one state folder, kept in the JSON file ``path``.

    ``round_lock`` is the lock a process holds while it runs a round (default ``round.lock`` beside
    the log): a ``running`` entry whose round lock nobody holds belongs to a process that died.
    """

    def __init__(self, path: str, round_lock: Optional[str] = None):
        self.path = os.path.abspath(path)
        self.round_lock = round_lock or os.path.join(os.path.dirname(self.path), "round.lock")
        self._write_lock = self.path + ".lock"

    # --- reading ------------------------------------------------------------------------------------
    def entries(self) -> List[Dict]:
        """All rounds, oldest first ([] when there is no log yet or it cannot be read)."""
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            logger.error(f"round log {self.path} cannot be read ({e}); treating it as empty")
            return []
        if not isinstance(data, list):
            logger.error(f"round log {self.path} is not a list of rounds; treating it as empty")
            return []
        return data

    def get(self, n: int) -> Optional[Dict]:
        for e in self.entries():
            if e.get("round") == n:
                return e
        return None

    def current(self) -> Optional[Dict]:
        """The round running now (in any process), or None.

        A ``running`` entry counts only while some process holds the round lock: the entry of a
        killed process is not reported as current even before ``mark_interrupted`` rewrites it.
        """
        running = [e for e in self.entries() if e.get("status") == RUNNING]
        if not running or not is_locked(self.round_lock):
            return None
        return running[-1]

    def last_finished(self) -> Optional[Dict]:
        """The latest round that has ended (done, failed or interrupted), or None."""
        ended = [e for e in self.entries() if e.get("status") in ENDED]
        return ended[-1] if ended else None

    def last_done(self) -> Optional[Dict]:
        """The latest round that ended successfully, or None."""
        done = [e for e in self.entries() if e.get("status") == DONE]
        return done[-1] if done else None

    def summary(self) -> Dict:
        """For ``/info/``: {"current": entry or None, "last": entry or None, "rounds": count} (no id lists)."""
        entries = self.entries()
        return {"current": compact(self.current()), "last": compact(self.last_finished()), "rounds": len(entries)}

    # --- writing: callers that run rounds hold the round lock; the log lock guards each change ----------
    def _change(self, fn):
        with FileLock(self._write_lock):
            entries = self._load_for_write()
            result = fn(entries)
            write_json_atomic(self.path, entries)
            return result

    def _load_for_write(self) -> List[Dict]:
        try:
            with open(self.path) as f:
                data = json.load(f)
            if isinstance(data, list):
                return data
            raise ValueError("not a list")
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            # Keep the unreadable file for a person to look at rather than overwrite it.
            aside = f"{self.path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(self.path, aside)
            logger.error(f"round log {self.path} was unreadable ({e}); moved to {aside}, starting a new log")
            return []

    def start(self, trigger: str, labels: Optional[Sequence[str]]) -> Dict:
        """Append a ``running`` round numbered after the highest so far; returns the new entry.

        ``labels``: ids of the final labels the round trains on (None: not known to the caller).
        """

        def add(entries):
            n = max((int(e.get("round", 0)) for e in entries), default=0) + 1
            entry = {
                "round": n,
                "status": RUNNING,
                "pid": os.getpid(),
                "trigger": trigger,
                "started_at": now_iso(),
                "labels_used": None if labels is None else len(labels),
                "label_ids": [] if labels is None else sorted(str(i) for i in labels),
            }
            entries.append(entry)
            return dict(entry)

        entry = self._change(add)
        logger.info(f"round {entry['round']} started ({trigger}, {entry['labels_used']} final labels)")
        return entry

    def _end(self, n: int, status: str, fields: Dict) -> Dict:
        def end(entries):
            for e in entries:
                if e.get("round") == n:
                    e.update(fields)
                    e["status"] = status
                    e["ended_at"] = now_iso()
                    if e.get("seconds") is None:
                        e["seconds"] = _seconds_since(e.get("started_at"))
                    return dict(e)
            raise KeyError(f"round {n} is not in {self.path}")

        return self._change(end)

    def finish(self, n: int, **fields) -> Dict:
        """Round ``n`` is done; ``fields`` (dice, mean_dice, published, rescored, top, seconds...) are stored."""
        entry = self._end(n, DONE, fields)
        logger.info(f"round {n} done in {entry.get('seconds')} s: mean Dice {entry.get('mean_dice')}")
        return entry

    def fail(self, n: int, error: str, **fields) -> Dict:
        """Round ``n`` failed with ``error``; the models published before it stay in use."""
        entry = self._end(n, FAILED, {**fields, "error": str(error)})
        logger.error(f"round {n} failed after {entry.get('seconds')} s: {error}; the previous models stay")
        return entry

    def interrupt(self, n: int, error: str) -> Dict:
        """Round ``n`` was stopped before it ended (process killed, server restarted)."""
        entry = self._end(n, INTERRUPTED, {"error": error})
        logger.warning(f"round {n} marked interrupted: {error}")
        return entry

    def interrupt_running(self, error: str = "the process running it stopped before it ended") -> List[int]:
        """Mark every ``running`` entry interrupted; only for a caller that holds the round lock
        (then no round can be running anywhere). Returns the round numbers marked."""

        def mark(entries):
            marked = []
            for e in entries:
                if e.get("status") == RUNNING:
                    e["status"] = INTERRUPTED
                    e["ended_at"] = now_iso()
                    e["error"] = f"{error} (pid {e.get('pid')})"
                    marked.append(e.get("round"))
            return marked

        if not any(e.get("status") == RUNNING for e in self.entries()):
            return []
        marked = self._change(mark)
        for n in marked:
            logger.warning(f"round {n} was interrupted (its process stopped before it ended)")
        return marked

    def mark_interrupted(self) -> List[int]:
        """At start-up: mark the rounds left ``running`` by a dead process as ``interrupted``.

        If nobody holds the round lock no round can be running anywhere, so every ``running`` entry is
        stale, whatever its pid (a restarted container can reuse the old pid). If a round holds the lock
        (another process is running one) nothing is touched: its entry is live, and older stale entries
        are marked by the next round when it takes the lock. Returns the round numbers marked.
        """
        # Shared: enough to know no round runs (a runner holds it exclusively) while we rewrite.
        lock = FileLock(self.round_lock)
        if not lock.acquire(blocking=False, shared=True):
            return []
        try:
            return self.interrupt_running("the server stopped before the round ended")
        finally:
            lock.release()
