"""MONAI Label strategy ``importance``: the unlabeled volume that most needs a human, with its organs."""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Dict, Tuple

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.datastore import ranked_pool
from lib.importance.records import is_scored

logger = logging.getLogger(__name__)

class ImportanceStrategy(Strategy):
    """Highest importance score first among images without a final label.

    An image handed out in the last ``hold_s`` seconds is not handed out again (so annotators asking at
    the same time get different volumes). Unscored images (or those whose scoring failed) come after
    the scored ones, by id. Returns ``{}`` when nothing is left.
    """

    def __init__(self, hold_s: float = 1800.0):
        super().__init__("Highest AbdomenAtlas-8K importance score first, with the organs to revise")
        self.hold_s = hold_s
        self._handed: Dict[str, Tuple[str, float]] = {}
        self._lock = threading.Lock()

    def __call__(self, request, datastore: Datastore):
        client = str(request.get("client_id") or "anonymous")
        with self._lock:
            now = time.time()
            self._handed = {k: v for k, v in self._handed.items() if now - v[1] < self.hold_s}
            scored, unscored = ranked_pool(datastore, exclude=self._handed)
            if not scored and not unscored:
                return {}
            image_id, rec = (scored or unscored)[0]
            rec = copy.deepcopy(rec)  # the datastore's own record: the answer must not share it
            self._handed[image_id] = (client, now)
        out = {"id": image_id, "scored": is_scored(rec)}
        if out["scored"]:
            out.update(
                {
                    "score": rec["score"],
                    "organs": rec.get("organs", []),
                    "attention_ml": rec.get("attention_ml", {}),
                    "models": rec.get("models", {}),
                }
            )
        logger.info(f"importance: {image_id} for {client} (score {out.get('score', 'none')})")
        return out
