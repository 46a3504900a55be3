"""Train task ``round``: one active-learning round (retrain every backbone, re-score, re-rank).

Registered as a MONAI Label trainer so that MONAI Label's own train endpoint (and Slicer's "Train"
button) starts a round; the round manager decides whether it runs now or is queued.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from lib.datastore import ranked_pool
from lib.files import file_version
from lib.stopping import check_stop

logger = logging.getLogger(__name__)


def per_organ(values, organs: List[str]) -> Dict[str, float]:
    """MONAI's per-channel Dice (a list, one value per class) as {organ: Dice}."""
    if isinstance(values, (int, float)) or values is None:
        return {}
    return {o: round(float(v), 4) for o, v in zip(organs, values)}


def run_round(entry: Dict, trainers: Dict, scoring, datastore: Datastore, organs: List[str], top_n: int = 5) -> Dict:
    """Retrain each backbone on all final labels, re-score the pool, rank: the fields of the round log."""
    n = entry["round"]
    dice, mean, published, revised, val_revised = {}, {}, {}, {}, {}
    for backbone, trainer in trainers.items():
        if not trainer.registry.available(backbone):
            logger.info(f"round {n}: {backbone} has no weights; not trained")
            continue
        check_stop(f"round {n}: {backbone} not trained")
        logger.info(f"round {n}: training {backbone}")
        res = trainer({"name": f"round_{n:03d}", "round": n, "source": f"fine-tuned (round {n})"}, datastore)
        metrics = (res.get("eval") or {}).get("metrics") or {}
        val_with = res.get("val_revised_images") or {}
        # An organ revised in no validation image has no Dice (MONAI reports 0 for a channel it never saw).
        dice[backbone] = {o: (v if val_with.get(o, 1) else None) for o, v in per_organ(metrics.get("val_dice_per_organ"), organs).items()}
        key = (res.get("eval") or res.get("train") or {}).get("best_metric", res.get("best_metric"))
        mean[backbone] = round(float(key), 4) if key is not None else None
        published[backbone] = {"file": res["published"], "version": file_version(res["published"])}
        revised = res.get("revised_images") or revised
        val_revised = res.get("val_revised_images") or val_revised
    check_stop(f"round {n}: pool not re-scored")
    rescored = scoring({}, datastore) if scoring else {}
    scored, _ = ranked_pool(datastore)
    return {
        "dice": dice,
        "mean_dice": mean,
        "published": published,
        # Per organ: labelled images with it revised (what the round learnt from), and validation images
        # with it revised (its Dice above is over those only).
        "revised_images": revised,
        "val_revised_images": val_revised,
        "rescored": rescored.get("scored", 0),
        "rescore_failed": rescored.get("failed", 0),
        "top": [{"id": i, "score": r["score"], "organs": r.get("organs", [])[:5]} for i, r in scored[:top_n]],
    }


class RoundTrainTask(TrainTask):
    """``POST /train/round`` asks the round manager for a round (run now, or queued once)."""

    def __init__(self, trigger: Callable[[str, bool], str], info: Callable[[], Dict]):
        super().__init__("Active-learning round: retrain all backbones on final labels, re-score, re-rank")
        self._trigger = trigger
        self._info = info

    def stats(self):
        return self._info()

    def __call__(self, request, datastore: Datastore):
        # MONAI Label runs train requests in a child process: wait there, so the round is not cut short.
        state = self._trigger("train endpoint", True)
        return {"round": state, **self._info()}
