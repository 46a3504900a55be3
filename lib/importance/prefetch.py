"""One volume ahead: the next volume is loaded and pre-processed on a background thread while the
current one is scored, so the host work (reading, resampling to 1.5 mm) hides behind the GPU work.

``load`` is the host part of scoring a volume and ``score_loaded`` the device part; ``score_one`` in
``lib.importance.engines`` is the two in a row. ``Ahead`` keeps at most one volume loaded ahead (one
more pre-processed volume in memory, ~4 bytes per working-grid voxel); ``score_in_order`` scores a list
of volumes with it, as the in-process engine does; each Ray worker keeps its own ``Ahead``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from lib.files import file_stamp
from lib.importance.failures import describe_error
from lib.stopping import stop_requested


@dataclass
class Loaded:
    """A volume read and pre-processed (``image``), or the error that stopped it."""

    path: str
    stamp: Dict = field(default_factory=dict)
    image: Any = None
    error: Optional[BaseException] = None
    seconds: float = 0.0


def load(scorer, path: str) -> Loaded:
    """Read and pre-process one volume; an error is kept for its record, not raised."""
    stamp = file_stamp(path)  # before reading: a file replaced meanwhile is scored again next time
    start = time.perf_counter()
    try:
        image = scorer.preprocess(path)
    except Exception as e:  # one bad study must not stop a run
        return Loaded(path, stamp, error=e, seconds=time.perf_counter() - start)
    return Loaded(path, stamp, image, seconds=time.perf_counter() - start)


def score_loaded(scorer, loaded: Loaded) -> Dict:
    """The volume's record: its score and stages, or the error of its loading or its scoring."""
    try:
        if loaded.error is not None:
            raise loaded.error
        record, _ = scorer.score_image(loaded.image, loaded.seconds)
    except Exception as e:  # one bad study must not stop a run
        record = {"error": describe_error(e)[:500], "models": scorer.versions(), "method": scorer.method()}
    record["file"] = loaded.stamp
    return record


class Ahead:
    """Loads at most one volume ahead on a background thread.

    ``start(path)`` returns once the thread has begun loading ``path``; ``take(path)`` gives that
    volume when it was started, else loads it now (a volume started but never taken is dropped).
    """

    def __init__(self, load_one: Callable[[str], Loaded]):
        self.load_one = load_one
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._next: Optional[Tuple[str, Future]] = None
        self.hits = 0  # volumes taken from the background thread

    def start(self, path: str) -> None:
        begun = threading.Event()

        def run():
            begun.set()
            return self.load_one(path)

        self._next = (path, self._pool.submit(run))
        begun.wait()

    def take(self, path: str) -> Loaded:
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == path:
            self.hits += 1
            return ahead[1].result()
        return self.load_one(path)

    def close(self) -> None:
        """Drop a volume loaded ahead but not taken (a run stopped); a load under way finishes on its own."""
        self._next = None
        self._pool.shutdown(wait=False, cancel_futures=True)


Job = Tuple[str, str]  # (image id, image file)
StillWanted = Optional[Callable[[str], bool]]


class Feed:
    """The volumes of a run, handed to one worker (in-process) or several (Ray): each gets its next volume
    and is told the one after, which it loads while it scores. ``still_wanted`` is asked when a volume is
    told and again when it is handed out; the volumes it turns down go to ``dropped``. Once the process
    is asked to stop (``lib.stopping``) nothing more is handed out: ``left()`` is what a next run scores."""

    def __init__(self, jobs: Sequence[Job], still_wanted: StillWanted = None):
        self.queue = deque(jobs)
        self.still_wanted = still_wanted
        self.dropped: List[str] = []
        self.told: Dict[int, Job] = {}  # the volume each worker loads ahead

    def _wanted(self, job: Job) -> bool:
        if self.still_wanted is None or self.still_wanted(job[0]):
            return True
        self.dropped.append(job[0])
        return False

    def _take(self) -> Optional[Job]:
        while self.queue:
            job = self.queue.popleft()
            if self._wanted(job):
                return job
        return None

    def next_for(self, worker: int) -> Tuple[Optional[Job], Optional[str]]:
        """(the volume worker ``worker`` scores now, the path of the one it loads meanwhile)."""
        if stop_requested():
            return None, None
        job = self.told.pop(worker, None)
        if job is None or not self._wanted(job):
            job = self._take()
        if job is None:
            return None, None
        following = self._take()
        if following is not None:
            self.told[worker] = following
        return job, following and following[1]

    def left(self) -> List[str]:
        """Ids of the volumes not handed out (stopped early), those told to a worker first."""
        return [job[0] for job in self.told.values()] + [job[0] for job in self.queue]

    def give_back(self, worker: int) -> None:
        """A worker is gone: the volume it was told of goes back to the front of the queue."""
        if worker in self.told:
            self.queue.appendleft(self.told.pop(worker))


def score_in_order(
    scorer,
    jobs: Sequence[Job],
    on_result: Callable[[str, Dict], None],
    still_wanted: StillWanted = None,
    prefetch: bool = True,
) -> Feed:
    """Score ``jobs`` one after the other, the next one loaded while the current one is scored (or
    not, ``prefetch=False``). Returns the run's feed: ``dropped`` (the ids ``still_wanted`` turned down:
    not scored) and ``left()`` (not started because the process is stopping)."""
    feed = Feed(jobs, still_wanted)
    ahead = Ahead(lambda path: load(scorer, path)) if prefetch else None
    try:
        job, following = feed.next_for(0)
        while job is not None:
            loaded = ahead.take(job[1]) if ahead else load(scorer, job[1])
            if following is not None and ahead:
                ahead.start(following)
            on_result(job[0], score_loaded(scorer, loaded))
            job, following = feed.next_for(0)
    finally:
        if ahead:
            ahead.close()
    return feed
