"""The per-image importance record: where it is kept, when it is current, and the ranking it gives.

A record is the dict ``VolumeScorer.record`` makes (score, organs by priority, attention mL, the model
versions that produced it), plus ``file``: the image file's stamp when it was read. A failed volume's
record holds ``error`` instead of a score. The server keeps records in each image's datastore info
under ``INFO_KEY``; the offline ranking keeps them as JSON files.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Tuple

INFO_KEY = "importance"

Ranked = List[Tuple[str, Dict]]


def is_current(record: Dict, versions: Dict[str, str], stamp: Dict, method: Dict) -> bool:
    """A stored record (score or error) was made by the model files in use now, the same scoring method
    (``VolumeScorer.method``: formula version and options), on this very file."""
    return (
        bool(record)
        and record.get("models") == versions
        and record.get("method") == method
        and record.get("file") == stamp
    )


def is_scored(record: Dict) -> bool:
    return "score" in record and "error" not in record


def ranking(image_ids: Iterable[str], record_of: Callable[[str], Dict], exclude=()) -> Tuple[Ranked, Ranked]:
    """(scored images by descending score then id, unscored or failed images by id), leaving out
    ``exclude``; ``record_of(image_id)`` gives an image's record (``{}`` when it has none)."""
    scored, unscored = [], []
    for image_id in image_ids:
        if image_id in exclude:
            continue
        record = record_of(image_id) or {}
        if is_scored(record):
            scored.append((-float(record["score"]), image_id, record))
        else:
            unscored.append((image_id, record))
    by_score = [(image_id, record) for _, image_id, record in sorted(scored, key=lambda t: t[:2])]
    return by_score, sorted(unscored, key=lambda t: t[0])


def remaining(record: Dict, revised: Iterable[str]) -> Dict:
    """The record of a partly revised image: only its organs not revised yet count.

    ``organs`` keeps the unrevised organs with attention (in priority order); ``score`` sums their terms
    (``organ_scores``; a record without them splits the score by attention volume); ``revised`` lists
    the organs already revised. The stored record is not changed.
    """
    done = set(revised)
    out = dict(record)
    out["organs"] = [o for o in record.get("organs", []) if o not in done]
    out["revised"] = sorted(done)
    if not is_scored(record):
        return out
    terms = record.get("organ_scores")
    if terms is None:  # a record made before organ terms were stored: the score shared by attention volume
        ml = record.get("attention_ml") or {}
        total = sum(ml.values())
        terms = {o: float(record["score"]) * v / total for o, v in ml.items()} if total else {}
    left = sum(float(v) for o, v in terms.items() if o not in done)
    out["score"] = int(round(left)) if isinstance(record["score"], int) else round(left, 6)
    return out
