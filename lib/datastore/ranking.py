"""The importance ranking of a datastore's pool: images without a final label, and images whose final
label still has organs nobody revised (organ-level revision, ``lib.datastore.revisions``)."""

from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

from lib.importance.records import INFO_KEY, Ranked, is_scored, ranking, remaining

from .checked import info_reader, labeled_images_now
from .revisions import revised_in


def partly_revised(datastore) -> List[str]:
    """Images with a final label in which some organ is still a pseudo label ([] for datastores that
    keep no organ records: there a final label is a whole-volume revision)."""
    reader = getattr(datastore, "partly_revised_images", None)
    return list(reader()) if reader else []


def revised_organs(datastore, image_id: str) -> Optional[List[str]]:
    """Organs revised in the image's final label (None: no organ records kept for it)."""
    organs_of = getattr(datastore, "organs_of", None)
    names = getattr(datastore, "label_names", None)
    if organs_of is None or names is None:
        return None
    organs = organs_of(image_id)
    return None if organs is None else revised_in(organs, names)


def pool_images(datastore, partly: Optional[List[str]] = None) -> List[str]:
    """What scoring and Next Sample look at: images without a final label, then partly revised ones
    (``partly``: ``partly_revised(datastore)`` when the caller has it already)."""
    unlabeled = list(datastore.get_unlabeled_images())
    seen = set(unlabeled)
    return unlabeled + [i for i in (partly_revised(datastore) if partly is None else partly) if i not in seen]


def fully_revised_now(datastore) -> Set[str]:
    """Images whose final label, as the store holds it now, has every organ revised."""
    labelled = set(labeled_images_now(datastore))  # re-reads the store
    return labelled - set(partly_revised(datastore))


def ranked_pool(datastore, exclude=()) -> Tuple[Ranked, Ranked]:
    """(scored pool images by descending score then id; unscored or failed ones without a final label, by id).

    A partly revised image is ranked on its unrevised organs only (``records.remaining``): it stays in
    the pool while some unrevised organ carries attention. Records are read in place where the datastore
    allows it: ``get_image_info`` deep-copies each image's whole info (~0.1 s per request for 1,000).
    """
    read = info_reader(datastore)
    partly_list = partly_revised(datastore)
    partly = set(partly_list)

    def record_of(image_id: str) -> Dict:
        record = read(image_id).get(INFO_KEY) or {}
        if image_id in partly:
            record = remaining(record, revised_organs(datastore, image_id) or []) if is_scored(record) else {}
        return record

    scored, unscored = ranking(pool_images(datastore, partly_list), record_of, exclude)
    scored = [(i, r) for i, r in scored if i not in partly or r.get("organs")]
    unscored = [(i, r) for i, r in unscored if i not in partly]
    return scored, unscored


def revision_progress(datastore, label_names: List[str]) -> Dict[str, Dict[str, int]]:
    """Per organ: ``revised`` (images whose final label has it revised) and ``attention`` (pool images
    where it is unrevised and its importance record still names it to revise)."""
    read = info_reader(datastore)
    progress = {n: {"revised": 0, "attention": 0} for n in label_names}
    labelled = set(datastore.get_labeled_images())
    for image_id in labelled:
        done = revised_organs(datastore, image_id)
        for n in label_names if done is None else done:
            if n in progress:
                progress[n]["revised"] += 1
    for image_id in pool_images(datastore):
        record = read(image_id).get(INFO_KEY) or {}
        done = set(revised_organs(datastore, image_id) or []) if image_id in labelled else set()
        for n in record.get("organs", []) if is_scored(record) else []:
            if n in progress and n not in done:
                progress[n]["attention"] += 1
    return progress
