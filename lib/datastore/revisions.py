"""Organ-level revision: which organs of an image a person revised, and the merged final label.

A final label's info holds ``organs``: one record per organ of the app's label set::

    {"liver": {"state": "revised", "ts": 1700000000, "client_id": "annotator-1", "model": {"segresnet": "ab12.."}},
     "spleen": {"state": "pseudo", ...}, ...}

``revised``: a person checked that organ's voxels; ``pseudo``: the voxels are the model's (or an
unchecked draft's) and train only at ``pseudo_weight``. ``model`` is the record of the models that made
the pre-annotation (the image's importance record ``models``). A final label without ``organs`` was saved
before organ-level revision existed, or as a whole volume: every organ counts as revised.

A Submit Label without ``revised`` (OHIF, 3D Slicer: they send the label and ``label_info`` only) is read by
``implied_revision``: after an organ-level Next Sample the organs handed out to that annotator, plus the
organs whose voxels the annotator changed against the pre-annotation served for the image
(``changed_organs``); without an organ-level hand-out, a whole-volume revision as before.

Pure functions on dicts and arrays: the datastores call them under their file lock.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

REVISED, PSEUDO = "revised", "pseudo"
ORGANS_KEY = "organs"
PARAM = "revised"


class RevisionError(ValueError):
    """A ``revised`` list the app cannot take (unknown organ names, not a list of names)."""


def requested_organs(params: Mapping, label_names: Sequence[str]) -> Optional[List[str]]:
    """The organs a Submit Label says were revised (``params["revised"]``), in the label set's order;
    None when the params name none (a whole-volume revision). Raises RevisionError naming unknown names."""
    value = (params or {}).get(PARAM)
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RevisionError(f"'{PARAM}' must be a list of organ names; got {value!r}")
    unknown = sorted(set(value) - set(label_names))
    if unknown:
        raise RevisionError(f"'{PARAM}' names organs that are not in this app's label set: {', '.join(unknown)}")
    if not value:
        raise RevisionError(f"'{PARAM}' is empty: name the revised organs, or leave it out for a whole-volume revision")
    return [n for n in label_names if n in set(value)]


def changed_organs(new: np.ndarray, served: np.ndarray, classes: Mapping[str, int]) -> List[str]:
    """Organs (``classes``: name -> class index, in the order wanted) whose voxels differ between the label
    map ``new`` and the pre-annotation ``served`` (same grid): drawn, erased or moved anywhere, by even one
    voxel. Raises ValueError when the grids differ."""
    new, served = np.asarray(new), np.asarray(served)
    if new.shape != served.shape:
        raise ValueError(f"label shape {new.shape} differs from the pre-annotation's {served.shape}")
    differ = new != served
    touched = set(np.unique(new[differ]).tolist()) | set(np.unique(served[differ]).tolist())
    return [n for n, v in classes.items() if int(v) in touched]


def implied_revision(
    handed: Optional[Sequence[str]], changed: Optional[Sequence[str]], label_names: Sequence[str]
) -> Optional[List[str]]:
    """The organs a save that names none revised, in the label set's order: the organs Next Sample handed to
    the saving annotator (``handed``; None or empty: no organ-level hand-out) and those they changed against
    the pre-annotation (``changed``; None: no pre-annotation to compare). None, a whole-volume revision,
    when nothing was handed out at organ level: a save without a hand-out behaves as it always did."""
    if not handed:
        return None
    revised = set(handed) | set(changed or ())
    return [n for n in label_names if n in revised]


def revised_in(organs: Optional[Mapping[str, Dict]], label_names: Iterable[str]) -> List[str]:
    """Organs recorded as revised; every organ when there is no record (a whole-volume label). An organ
    the record does not name (a record made with another label set) counts as not revised."""
    if not organs:
        return list(label_names)
    return [n for n in label_names if (organs.get(n) or {}).get("state") == REVISED]


def unrevised_in(organs: Optional[Mapping[str, Dict]], label_names: Iterable[str]) -> List[str]:
    names = list(label_names)
    done = set(revised_in(organs, names))
    return [n for n in names if n not in done]


def organ_records(
    previous: Optional[Mapping[str, Dict]],
    revised_now: Sequence[str],
    label_names: Sequence[str],
    ts: int,
    client_id: str,
    model: Optional[Dict],
) -> Dict[str, Dict]:
    """The ``organs`` record after a save: organs revised now get a new revised entry; organs revised
    before keep theirs; every other organ becomes pseudo, from this save."""
    before = set(revised_in(previous, label_names)) if previous else set()
    now = set(revised_now)
    out: Dict[str, Dict] = {}
    for name in label_names:
        if name in now:
            out[name] = {"state": REVISED, "ts": ts, "client_id": client_id, "model": model}
        elif name in before:
            out[name] = dict(previous[name])
        else:
            out[name] = {"state": PSEUDO, "ts": ts, "client_id": client_id, "model": model}
    return out


def merge_label(
    new: np.ndarray,
    stored: Optional[np.ndarray],
    keep_from_stored: Sequence[int],
) -> np.ndarray:
    """The final label after a partial save: the new file, except that the classes ``keep_from_stored``
    (organs revised before, not revised now) are exactly as in ``stored``: their voxels there win over
    anything in the new file, and the new file's voxels of those classes elsewhere become background."""
    out = np.array(new, copy=True)
    if stored is None or not len(keep_from_stored):
        return out
    keep = np.asarray(list(keep_from_stored), dtype=np.int64)
    out[np.isin(out, keep)] = 0
    kept = np.isin(stored, keep)
    out[kept] = stored[kept].astype(out.dtype)
    return out
