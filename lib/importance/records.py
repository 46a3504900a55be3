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


def is_current(record: Dict, versions: Dict[str, str], stamp: Dict) -> bool:
    """A stored record (score or error) was made by the model files in use now, on this very file."""
    return bool(record) and record.get("models") == versions and record.get("file") == stamp


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
