"""MONAI Label scoring method ``importance``: score every image that has no final label yet."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Dict

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.errors import describe_error
from lib.scoring.volume import VolumeScorer

logger = logging.getLogger(__name__)

INFO_KEY = "importance"


def file_stamp(path: str) -> Dict:
    try:
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return {}


def is_current(record: Dict, versions: Dict[str, str], stamp: Dict) -> bool:
    """A stored record (score or error) was made by the model files in use now, on this very file."""
    return bool(record) and record.get("models") == versions and record.get("file") == stamp


class ImportanceScoring(ScoringMethod):
    """For each image without a final label: run the backbones, compute the attention, store the result.

    Stored under ``info["importance"]`` of the image in the datastore: score, organs by priority,
    attention volume per organ (mL), and the model files (versions) that produced them. An image
    already scored by the current models is skipped; a corrupt image is recorded with its error and
    skipped; the run goes on. Runs never overlap (a second call waits for the first).
    """

    def __init__(self, scorer: VolumeScorer, on_done=None):
        super().__init__("AbdomenAtlas-8K importance: uncertainty, inconsistency and overlap attention")
        self.scorer = scorer
        self.on_done = on_done
        self._lock = threading.Lock()
        self.last_run: Dict = {}

    def info(self):
        info = super().info()
        info.update({"backbones": self.scorer.active(), "labels": len(self.scorer.labels), "last_run": self.last_run})
        return info

    def __call__(self, request, datastore: Datastore):
        with self._lock:
            return self._run(request, datastore)

    def _run(self, request, datastore: Datastore) -> Dict:
        if not self.scorer.active():
            logger.warning("importance scoring: no backbone has weights; nothing scored")
            return {"scored": 0, "skipped": 0, "failed": 0}
        versions = self.scorer.versions()
        todo = sorted(datastore.get_unlabeled_images())
        force = str(request.get("force", "false")).lower() == "true"
        n, scored, skipped, failed = len(todo), 0, 0, 0
        start = time.time()
        for i, image_id in enumerate(todo, 1):
            info = datastore.get_image_info(image_id)
            path = datastore.get_image_uri(image_id)
            stamp = file_stamp(path)
            if not force and is_current(info.get(INFO_KEY, {}), versions, stamp):
                skipped += 1
                continue
            t0 = time.time()
            try:
                record, _ = self.scorer.score_file(path)
                scored += 1
            except Exception as e:  # a bad study must not stop the run
                record = {"error": describe_error(e)[:500], "models": versions}
                failed += 1
                logger.error(f"importance {i}/{n} {image_id}: {record['error']}")
            record["file"] = stamp
            datastore.update_image_info(image_id, {INFO_KEY: record})
            if "error" not in record:
                logger.info(
                    f"importance {i}/{n} {image_id}: score {record['score']} "
                    f"top {record['organs'][:3]} ({time.time() - t0:.1f} s)"
                )
        self.last_run = {
            "scored": scored,
            "skipped": skipped,
            "failed": failed,
            "images": n,
            "models": versions,
            "seconds": round(time.time() - start, 1),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        logger.info(f"importance scoring done: {self.last_run}")
        if self.on_done:
            self.on_done(self.last_run)
        return self.last_run


