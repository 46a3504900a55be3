"""MONAI Label scoring method ``importance``: score every image not fully revised yet."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Dict, Optional

from filelock import FileLock, Timeout
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.datastore import fully_revised_now, info_reader, pool_images
from lib.files import file_stamp
from lib.importance.engines import InProcessEngine
from lib.importance.records import INFO_KEY, is_current
from lib.importance.scorer import VolumeScorer

logger = logging.getLogger(__name__)


class ImportanceScoring(ScoringMethod):
    """For each image without a final label, and each whose final label still has unrevised organs: run
    the backbones, compute the attention, store the result.

    Stored under ``info["importance"]`` of the image in the datastore: score, organs by priority,
    attention volume per organ (mL), and the model files (versions) that produced them. An image
    already scored by the current models is skipped; a corrupt image is recorded with its error and
    skipped; the run goes on. ``engine``: where the volumes are scored (``lib.importance.engines``: in
    this process, or on Ray).

    One scoring of a pool at a time: runs never overlap, in one process (a second call waits for the
    first) or across processes sharing ``lock_path`` (MONAI Label's scoring subprocess and a round's
    re-scoring in its train subprocess: each would take every core). A run that finds a newer model
    published stops after the volume in hand (``superseded``); the run waiting next scores with it.
    """

    def __init__(self, scorer: VolumeScorer, engine=None, recheck_s: float = 10.0, lock_path: Optional[str] = None):
        super().__init__("AbdomenAtlas-8K importance: uncertainty, inconsistency and overlap attention")
        self.scorer = scorer
        self.engine = engine or InProcessEngine(scorer)
        # How often a run re-reads which images got a final label meanwhile (those are not scored).
        self.recheck_s = recheck_s
        self._lock = threading.Lock()
        self.lock_path = lock_path
        self.last_run: Dict = {}

    def info(self):
        info = super().info()
        info.update({"backbones": self.scorer.active(), "labels": len(self.scorer.labels), "last_run": self.last_run})
        return info

    def __call__(self, request, datastore: Datastore):
        with self._lock, self._pool_lock():
            return self._run(request, datastore)

    @contextmanager
    def _pool_lock(self):
        if not self.lock_path:
            with nullcontext():
                yield
            return
        lock = FileLock(self.lock_path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info("importance scoring: another scoring of this pool is running; waiting for it to end")
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def _run(self, request, datastore: Datastore) -> Dict:
        if not self.scorer.active():
            logger.warning("importance scoring: no backbone has weights; nothing scored")
            return {"scored": 0, "skipped": 0, "failed": 0}
        versions, method = self.scorer.versions(), self.scorer.method()
        todo = sorted(pool_images(datastore))
        force = str(request.get("force", "false")).lower() == "true"
        n, skipped = len(todo), 0
        counts = {"scored": 0, "failed": 0}
        start = time.time()
        jobs = []
        read = info_reader(datastore)  # only looks: no copy of every image's info per run
        for image_id in todo:
            info = read(image_id)
            path = datastore.get_image_uri(image_id)
            if not force and is_current(info.get(INFO_KEY, {}), versions, file_stamp(path), method):
                skipped += 1
            else:
                jobs.append((image_id, path))

        def store(image_id: str, record: Dict):
            # Stored as each volume finishes: an interrupted run keeps what it scored.
            datastore.update_image_info(image_id, {INFO_KEY: record})
            done = counts["scored"] + counts["failed"] + 1
            if "error" in record:
                counts["failed"] += 1
                logger.error(f"importance {done}/{len(jobs)} {image_id}: {record['error']}")
            else:
                counts["scored"] += 1
                logger.info(
                    f"importance {done}/{len(jobs)} {image_id}: score {record['score']} "
                    f"top {record['organs'][:3]} ({record.get('seconds', 0):.1f} s)"
                )

        # A run takes minutes to hours: images revised whole meanwhile (by annotators, while a round
        # re-scores) leave the pool; the revised set is re-read at most every recheck_s seconds.
        labelled = {"at": 0.0, "ids": set()}  # read before the first volume, then every recheck_s

        superseded = set()  # images left to the next run: a newer model was published meanwhile

        def still_wanted(image_id: str) -> bool:
            if superseded or self.scorer.versions() != versions:
                if not superseded:
                    logger.info("importance scoring: a newer model was published; this run stops, the next scores with it")
                superseded.add(image_id)
                return False
            if time.time() - labelled["at"] >= self.recheck_s:
                labelled["ids"] = fully_revised_now(datastore)
                labelled["at"] = time.time()
            return image_id not in labelled["ids"]

        summary = self.engine.run(jobs, store, still_wanted)
        scored, failed = counts["scored"], counts["failed"]
        self.last_run = {
            "scored": scored,
            "skipped": skipped,
            "failed": failed,
            "labelled_meanwhile": len(summary.get("dropped", [])) - len(superseded),
            "superseded": len(superseded),
            "images": n,
            "engine": summary.get("engine"),
            "lost": summary.get("lost", []) + summary.get("not_started", []),
            "models": versions,
            "seconds": round(time.time() - start, 1),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        logger.info(f"importance scoring done: {self.last_run}")
        return self.last_run


