"""MONAI Label strategy ``importance``: the volume (and organs) that most need a human."""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Set, Tuple

import numpy as np

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.datastore import ranked_pool, revised_organs
from lib.files import read_json, write_json_atomic
from lib.importance.diversity import diverse_batch, round_temperature
from lib.importance.records import Ranked, is_scored

logger = logging.getLogger(__name__)

WHOLE = "*"  # a hold on the whole image (not on some of its organs)
# Client ids that do not tell annotators apart: none sent (MONAI Label's Python client sends its own
# ``client_id``, None unless given to its constructor) and 3D Slicer's default "Client/User-ID".
UNIDENTIFIED = {"", "none", "anonymous", "user-xyz"}

Pick = Tuple[str, Dict, List[str]]  # (image, record, organs to name)


class Hold(NamedTuple):
    client: Optional[str]  # None: a request that did not say who asked
    since: float  # time.time() of the hand-out (or of the holder's last ask)
    revised: Optional[List[str]]  # the image's revised organs at hand-out (None: no final label then)


def client_of(request: Dict) -> Optional[str]:
    """The annotator asking, or None when the request does not tell annotators apart."""
    client = str(request.get("client_id") or "").strip()
    return None if client.lower() in UNIDENTIFIED else client


class ImportanceStrategy(Strategy):
    """Highest importance score first, among images without a final label and partly revised images
    (ranked on their unrevised organs; see ``lib.datastore.ranked_pool``).

    ``organs_per_sample`` K > 0: the answer names the K most important organs still unrevised and not
    handed to someone else, and only those organs are held; 0 (default): every organ with attention,
    and the whole image is held. What was handed out in the last ``hold_s`` seconds is not handed out
    again, so annotators asking at the same time get different work. Unscored images (or those whose
    scoring failed) come after the scored ones, by id. Returns ``{}`` when nothing is left.

    Asking again is idempotent for an annotator who says who they are (``client_id``): while the work
    handed to them is not done (no final label saved for the image since, or organs held still
    unrevised) they get the same image back, renewed for ``hold_s``, with its score and organs once
    scoring has made them. Requests without a client id get new work each time.

    ``diversity_temperature`` T > 0: annotators asking within ``hold_s`` get a batch, not the top of one
    sorted list: the scored pool is ordered by ``lib.importance.diversity.diverse_batch`` (stratified by
    the records' per-organ scores, Gumbel noise of temperature ``T * diversity_decay ** r`` in round r,
    ``r = round_of()``, default 0; the noise seeded by ``(seed, r)``, so one round's batch is the same
    for every request until the pool changes) and handed out in that order. T = 0 (default): the
    highest score first, as before.

    ``state_file``: where the hand-outs are kept (JSON, rewritten whole at each change), so a restarted
    server still knows, until ``hold_s`` runs out, who holds what: the annotator gets the same work back,
    others do not, and a save naming no organs counts the organs handed out. None: in memory only.
    """

    def __init__(
        self,
        hold_s: float = 1800.0,
        organs_per_sample: int = 0,
        diversity_temperature: float = 0.0,
        diversity_decay: float = 0.5,
        round_of: Optional[Callable[[], int]] = None,
        seed: int = 0,
        state_file: Optional[str] = None,
    ):
        super().__init__("Highest AbdomenAtlas-8K importance score first, with the organs to revise")
        self.hold_s = hold_s
        self.organs_per_sample = max(0, int(organs_per_sample or 0))
        self.diversity_temperature = float(diversity_temperature or 0.0)
        self.diversity_decay = float(diversity_decay)
        self.round_of = round_of
        self.seed = int(seed)
        self.state_file = state_file
        self._handed: Dict[str, Dict[str, Hold]] = self._read_handouts()  # image -> {organ or WHOLE: hold}
        self._lock = threading.Lock()

    def __call__(self, request, datastore: Datastore):
        client = client_of(request)
        self._read_labels_of_held(datastore)
        with self._lock:
            before = {image_id: dict(held) for image_id, held in self._handed.items()}
            now = time.time()
            self._expire(now)
            scored, unscored = ranked_pool(datastore, exclude=self._held_whole_by_others(client))
            pick = self._still_held(client, scored, unscored, datastore) if client else None
            if pick is None:
                self._release(client)  # an identified annotator's finished work no longer holds anything
                pick = self._pick(self._in_batch_order(scored, datastore) if self.diversity_temperature else scored, unscored)
            if pick is not None:
                image_id, rec, organs = pick
                rec = copy.deepcopy(rec)  # the datastore's own record: the answer must not share it
                self._hold(image_id, organs, Hold(client, now, revised_organs(datastore, image_id)))
            if self._handed != before:
                self._write_handouts()
        if pick is None:
            return {}
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
        logger.info(f"importance: {image_id} for {client or 'anonymous'} (score {out.get('score', 'none')}, organs {organs})")
        return out

    def organs_handed_to(self, client_id, image_id: str, anonymous: bool = False) -> Optional[List[str]]:
        """The organs of ``image_id`` handed to annotator ``client_id`` at organ level in the last ``hold_s``
        seconds (a Submit Label naming no organs counts them as revised); None when that annotator holds
        no organs of it (a whole-image hand-out, or none). A ``client_id`` that does not say who asks gets
        None, or, with ``anonymous`` (the datastore's ``anonymous_handouts``; DICOMweb: OHIF's panel sends
        no client id), every organ of the image handed out to requests that did not say who asked."""
        client = client_of({"client_id": client_id})
        if not client and not anonymous:
            return None
        with self._lock:
            now = time.time()
            held = self._handed.get(image_id, {})
            organs = [k for k, h in held.items() if h.client == client and self._open(h, now)]
        return None if not organs or WHOLE in organs else organs

    def open_handouts(self) -> List[Dict]:
        """What Next Sample holds now, newest first, for ``/info/`` (OHIF's Next Sample dialog shows only the
        study and series; its panel's Info link opens ``/info/``): per image and annotator, the organs to
        revise (``whole``: the whole image), who asked (``anonymous``: requests that said nobody, as OHIF's
        panel) and the seconds left of ``hold_s``."""
        with self._lock:
            now = time.time()
            grouped: Dict[Tuple[str, Optional[str]], List[Tuple[str, float]]] = {}
            for image_id, held in self._handed.items():
                for key, h in held.items():
                    if self._open(h, now):
                        grouped.setdefault((image_id, h.client), []).append((key, h.since))
        newest = {who: max(since for _, since in keys) for who, keys in grouped.items()}
        return [
            {
                "image": image_id,
                "client": client or "anonymous",
                "organs": "whole" if any(k == WHOLE for k, _ in keys) else [k for k, _ in keys],
                "hold_left_s": int(self.hold_s - (now - newest[(image_id, client)])),
            }
            for (image_id, client), keys in sorted(grouped.items(), key=lambda item: -newest[item[0]])
        ]

    def _read_handouts(self) -> Dict[str, Dict[str, Hold]]:
        """The hand-outs ``state_file`` kept (expired ones drop out at the next Next Sample); an entry
        that cannot be read is skipped with a warning: it is handed out again."""
        handed: Dict[str, Dict[str, Hold]] = {}
        if not self.state_file or not os.path.exists(self.state_file):
            return handed
        saved = read_json(self.state_file)
        if not isinstance(saved, dict):
            logger.warning(f"{self.state_file} cannot be read: no hand-out is kept from before the start")
            return handed
        for image_id, held in saved.items():
            try:
                handed[image_id] = {key: Hold(h["client"], float(h["since"]), h["revised"]) for key, h in held.items()}
            except (AttributeError, KeyError, TypeError, ValueError):
                logger.warning(f"{self.state_file}: the hand-out of {image_id} cannot be read; it is handed out again")
        return handed

    def _write_handouts(self) -> None:
        """Keep the hand-outs in ``state_file`` (whole or not at all); a failed write leaves them in memory."""
        if not self.state_file:
            return
        try:
            write_json_atomic(self.state_file, {i: {k: h._asdict() for k, h in held.items()} for i, held in self._handed.items()})
        except OSError as e:
            logger.warning(f"hand-outs not kept in {self.state_file} (a restart forgets them): {e}")

    def _read_labels_of_held(self, datastore) -> None:
        """Let the datastore read final labels of held images that reached it without a save through this
        server (``read_new_label``; DICOMweb: a SEG that OHIF stored in the PACS), while their hand-outs
        are open: what was handed out counts (outside the lock: the read asks ``organs_handed_to``)."""
        read = getattr(datastore, "read_new_label", None)
        if read is None:
            return
        with self._lock:
            held = list(self._handed)
        for image_id in held:
            read(image_id)

    def _open(self, hold: Hold, now: float) -> bool:
        """Whether ``hold`` is still open at time ``now``: made (or renewed) in the last ``hold_s`` seconds."""
        return now - hold.since < self.hold_s

    def _expire(self, now: float) -> None:
        kept = {}
        for image_id, held in self._handed.items():
            held = {k: h for k, h in held.items() if self._open(h, now)}
            if held:
                kept[image_id] = held
        self._handed = kept

    def _held_whole_by_others(self, client: Optional[str]) -> Set[str]:
        return {i for i, held in self._handed.items() if any(k == WHOLE and (h.client != client or not client) for k, h in held.items())}

    def _still_held(self, client: str, scored: Ranked, unscored: Ranked, datastore) -> Optional[Pick]:
        """The work ``client`` holds and has not finished, as the image stands now; None when there is none.

        A whole-image hold is finished once a final label was saved for the image after the hand-out (its
        revised organs changed) or the image left the pool; an organ hold once its organs are revised."""
        mine = [(image_id, key, h) for image_id, held in self._handed.items() for key, h in held.items() if h.client == client]
        if not mine:
            return None
        image_id = mine[0][0]  # an identified annotator holds one image at a time
        keys = {key: h for i, key, h in mine if i == image_id}
        rec = dict(scored).get(image_id)
        if WHOLE in keys:
            if revised_organs(datastore, image_id) != keys[WHOLE].revised:
                return None
            if rec is None:
                waiting = dict(unscored)
                return (image_id, waiting[image_id], []) if image_id in waiting else None
            return image_id, rec, self._free_organs(image_id, rec, client)  # scored since: now with its organs
        organs = [o for o in (rec or {}).get("organs", []) if o in keys]
        return (image_id, rec, organs) if organs else None

    def _free_organs(self, image_id: str, rec: Dict, client: Optional[str] = None) -> List[str]:
        """The record's organs not held by another annotator, the first K of them when K > 0."""
        held = self._handed.get(image_id, {})
        free = [o for o in rec.get("organs", []) if o not in held or (client and held[o].client == client)]
        return free[: self.organs_per_sample] if self.organs_per_sample else free

    def _in_batch_order(self, scored: Ranked, datastore) -> Ranked:
        """``scored`` in the order of this round's diverse batch over the whole scored pool (images held by
        others included: they are part of the batch handed out)."""
        pool, _ = ranked_pool(datastore)
        if not pool:
            return scored
        r = int(self.round_of() if self.round_of else 0)
        organs = sorted({o for _, rec in pool for o in rec.get("organ_scores", {})})
        per = np.array(
            [[0.0 if o in rec.get("revised", ()) else float(rec.get("organ_scores", {}).get(o, 0.0)) for o in organs]
             for _, rec in pool]
        ).reshape(len(pool), len(organs))
        order = diverse_batch(
            [float(rec["score"]) for _, rec in pool],
            len(pool),
            round_temperature(self.diversity_temperature, self.diversity_decay, r),
            np.random.default_rng([self.seed, r]),
            organ_scores=per if organs else None,
        )
        rank = {pool[i][0]: place for place, i in enumerate(order)}
        return sorted(scored, key=lambda entry: rank.get(entry[0], len(rank)))

    def _pick(self, scored: Ranked, unscored: Ranked) -> Optional[Pick]:
        """The first scored image with work nobody holds, else the first unscored one."""
        for image_id, rec in scored:
            held = self._handed.get(image_id, {})
            free = self._free_organs(image_id, rec)
            if held and not free:
                continue  # every organ left is with someone else
            return image_id, rec, free
        if unscored:
            return unscored[0][0], unscored[0][1], []
        return None

    def _hold(self, image_id: str, organs: List[str], hold: Hold) -> None:
        """Hold ``organs`` of the image (the whole image when K is 0 or no organs are named yet) for the
        asking annotator, replacing what that annotator held on it (a whole-image hold on an image
        scored since becomes a hold on its K organs)."""
        held = self._handed.setdefault(image_id, {})
        if hold.client:
            for key in [k for k, h in held.items() if h.client == hold.client]:
                del held[key]
        for key in organs if self.organs_per_sample and organs else [WHOLE]:
            held[key] = hold

    def _release(self, client: Optional[str]) -> None:
        if not client:
            return
        for image_id in list(self._handed):
            held = {k: h for k, h in self._handed[image_id].items() if h.client != client}
            if held:
                self._handed[image_id] = held
            else:
                del self._handed[image_id]
