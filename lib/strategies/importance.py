"""MONAI Label strategy ``importance``: the volume (and organs) that most need a human."""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Dict, List, Optional, Tuple

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.datastore import ranked_pool
from lib.importance.records import Ranked, is_scored

logger = logging.getLogger(__name__)

WHOLE = "*"  # a hold on the whole image (not on some of its organs)


class ImportanceStrategy(Strategy):
    """Highest importance score first, among images without a final label and partly revised images
    (ranked on their unrevised organs; see ``lib.datastore.ranked_pool``).

    ``organs_per_sample`` K > 0: the answer names the K most important organs still unrevised and not
    handed to someone else, and only those organs are held; 0 (default): every organ with attention,
    and the whole image is held. What was handed out in the last ``hold_s`` seconds is not handed out
    again, so annotators asking at the same time get different work. Unscored images (or those whose
    scoring failed) come after the scored ones, by id. Returns ``{}`` when nothing is left.
    """

    def __init__(self, hold_s: float = 1800.0, organs_per_sample: int = 0):
        super().__init__("Highest AbdomenAtlas-8K importance score first, with the organs to revise")
        self.hold_s = hold_s
        self.organs_per_sample = max(0, int(organs_per_sample or 0))
        self._handed: Dict[str, Dict[str, Tuple[str, float]]] = {}  # image -> {organ or WHOLE: (client, time)}
        self._lock = threading.Lock()

    def __call__(self, request, datastore: Datastore):
        client = str(request.get("client_id") or "anonymous")
        with self._lock:
            now = time.time()
            self._expire(now)
            whole = {i for i, held in self._handed.items() if WHOLE in held}
            scored, unscored = ranked_pool(datastore, exclude=whole)
            pick = self._pick(scored, unscored)
            if pick is None:
                return {}
            image_id, rec, organs = pick
            rec = copy.deepcopy(rec)  # the datastore's own record: the answer must not share it
            for key in organs if self.organs_per_sample and organs else [WHOLE]:
                self._handed.setdefault(image_id, {})[key] = (client, now)
        out = {"id": image_id, "scored": is_scored(rec)}
        if out["scored"]:
            out.update(
                {
                    "score": rec["score"],
                    "organs": organs,
                    "attention_ml": rec.get("attention_ml", {}),
                    "models": rec.get("models", {}),
                    "revised": rec.get("revised", []),
                }
            )
        logger.info(f"importance: {image_id} for {client} (score {out.get('score', 'none')}, organs {organs})")
        return out

    def _expire(self, now: float) -> None:
        kept = {}
        for image_id, held in self._handed.items():
            held = {k: v for k, v in held.items() if now - v[1] < self.hold_s}
            if held:
                kept[image_id] = held
        self._handed = kept

    def _pick(self, scored: Ranked, unscored: Ranked) -> Optional[Tuple[str, Dict, List[str]]]:
        """(image, record, organs to name): the first scored image with work nobody holds, else the
        first unscored one."""
        for image_id, rec in scored:
            held = self._handed.get(image_id, {})
            free = [o for o in rec.get("organs", []) if o not in held]
            if held and not free:
                continue  # every organ left is with someone else
            return image_id, rec, free[: self.organs_per_sample] if self.organs_per_sample else free
        if unscored:
            return unscored[0][0], unscored[0][1], []
        return None
