"""Refuse a label that does not fit its image before MONAI Label writes it into the datastore."""

from __future__ import annotations

import copy
import gzip
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException, MONAILabelError

from lib.classes import CLASS_INDEX, SUPREM_CLASSES
from lib.errors import refuse_path_characters
from lib.files import atomic_open, atomic_path
from lib.importance.records import INFO_KEY
from lib.monailabel_private import LocalDatastoreHooks
from lib.stopping import uninterrupted

from .revisions import ORGANS_KEY, REVISED, RevisionError, changed_organs, implied_revision, merge_label, organ_records
from .revisions import requested_organs, revised_in, unrevised_in

logger = logging.getLogger(__name__)


class LabelError(ValueError):
    """A label the datastore must not take (shape, geometry, values, empty)."""


class NotInDatastore(HTTPException, ImageNotFoundException):
    """An image or label the request names that the datastore does not hold: HTTP 404 naming it, and
    still MONAI Label's ``ImageNotFoundException`` for code that catches that."""

    def __init__(self, detail: str):
        HTTPException.__init__(self, status_code=404, detail=detail)
        self.error, self.msg = MONAILabelError.APP_ERROR, detail


def _read(path: str, what: str):
    try:
        if path.endswith((".nii", ".nii.gz")):
            img = nib.load(path)
            return np.asarray(img.dataobj), img.affine
        import itk

        img = itk.imread(path)
        arr = itk.array_view_from_image(img).T  # itk is z, y, x
        return np.asarray(arr), None
    except Exception as e:
        raise LabelError(f"could not read the {what} file: {str(e).splitlines()[0][:200]}") from e


def check_label(image_path: str, label_path: str, allowed: Iterable[int], allow_empty: bool = False) -> Dict:
    """Check a label map against its image: same grid, integer values within ``allowed`` (0 = background).

    Returns a small summary ({"values": [...], "voxels": n}); raises LabelError naming the problem.
    """
    lab, lab_aff = _read(label_path, "label")
    img, img_aff = _read(image_path, "image")
    if lab.ndim == 4 and lab.shape[-1] == 1:
        lab = lab[..., 0]
    if lab.shape != img.shape:
        raise LabelError(f"label shape {tuple(lab.shape)} does not match the image shape {tuple(img.shape)}")
    if lab_aff is not None and img_aff is not None and not np.allclose(lab_aff, img_aff, atol=1e-3):
        raise LabelError("label geometry (affine) does not match the image: it was drawn on another grid")
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.equal(np.mod(lab, 1), 0)):
            raise LabelError("label values must be whole class indices, found fractional values")
    values = np.unique(lab).astype(np.int64)
    bad = sorted(set(values.tolist()) - {0} - set(int(a) for a in allowed))
    if bad:
        raise LabelError(f"label values {bad[:10]} are not classes of this app's label set")
    n = int(np.count_nonzero(lab))
    if n == 0 and not allow_empty:
        raise LabelError("label is empty (no organ voxels); a final label must mark the organs")
    return {"values": [int(v) for v in values if v], "voxels": n}


# MONAI Label's tag for a label a model made for an image (its infer's ``save_label`` and batch infer keep
# theirs under it): here the pre-annotation an infer task last served for the image.
PREANNOTATION = DefaultLabelTag.ORIGINAL.value
# Key of a final label's info saying how a save that named no organs was read (hand-out, changed organs).
IMPLIED_KEY = "revised_from"

Handouts = Callable[[Optional[str], str], Optional[List[str]]]  # (client id, image id) -> organs handed out


def saving_client(params: Mapping) -> str:
    return str(params.get("client_id") or params.get("user") or "anonymous")


def implied_organs(
    handouts: Optional[Handouts],
    image_id: str,
    label_filename: str,
    params: Mapping,
    served: Optional[Tuple[str, Mapping]],
    classes: Mapping[str, int],
) -> Tuple[Optional[List[str]], Dict]:
    """The organs a final label that names none revised (``revisions.implied_revision``), and how they were
    found (for the label's info; {} for a whole-volume save).

    ``handouts(client, image)``: the organs Next Sample handed to that annotator for the image (the
    strategy's record; a request that does not say who asks gets what that record gives it); ``served``:
    (file, info) of the pre-annotation served for the image. It is compared only when it was served to the
    same annotator: another's may come from another model."""
    client = params.get("client_id")
    handed = handouts(client, image_id) if handouts else None
    if not handed:
        return None, {}
    changed = None
    if served is not None and str((served[1] or {}).get("client_id")) == str(client):
        try:
            new, _ = _read(label_filename, "label")
            old, _ = _read(served[0], "pre-annotation")
            changed = changed_organs(_squeeze(new), _squeeze(old), classes)
        except (LabelError, ValueError) as e:  # counted on the hand-out alone
            logger.warning(f"{image_id}: the label is not compared with its pre-annotation: {e}")
    revised = implied_revision(handed, changed, list(classes))
    logger.info(f"{image_id}: no 'revised' sent by {client}; handed out {handed}, changed {changed}: revised {revised}")
    return revised, {IMPLIED_KEY: {"handed_out": list(handed), "changed": changed}}


def revised_by_image(datastore, label_names: List[str]) -> Dict[str, List[str]]:
    """Image file (real path) -> the organs of ``label_names`` revised in its final label, for a datastore
    built on MONAI Label's local record (``LocalDatastoreHooks``; the DICOMweb datastore's cache too)."""
    model = datastore.record  # one snapshot: a reload swaps the record whole
    image_dir, out = model.image_path(), {}
    for image_id, obj in model.filter_by_tag(DefaultLabelTag.FINAL).items():
        path = os.path.realpath(os.path.join(image_dir, datastore.file_name(image_id, obj.image.ext)))
        out[path] = revised_in((obj.labels[DefaultLabelTag.FINAL].info or {}).get(ORGANS_KEY), label_names)
    return out


def labeled_images_now(datastore) -> List[str]:
    """Ids of the images with a final label as the store holds them now, not as this process last read
    them: rounds run in MONAI Label's train subprocess while the server saves labels."""
    if hasattr(datastore, "forget_cached_lists"):  # DICOMweb: the labelled-series list is cached
        datastore.forget_cached_lists()
    elif isinstance(datastore, LocalDatastore):
        datastore.refresh()
    return datastore.get_labeled_images()


def info_reader(datastore):
    """``image id -> info`` for code that only reads: the datastore's in-place view where it has one
    (``peek_image_info``), else MONAI Label's ``get_image_info`` (a copy per call)."""
    return getattr(datastore, "peek_image_info", None) or datastore.get_image_info


def recorded_image(record: LocalDatastoreModel, image_id: str) -> ImageLabelModel:
    """The record's entry of an image; 404 (``NotInDatastore``) naming it when the record has none."""
    obj = record.objects.get(image_id)
    if not obj:
        raise NotInDatastore(f"image {image_id!r} is not in the datastore")
    return obj


class PreannotationStore:
    """The label an infer served for an image, kept as its pre-annotation (MONAI Label's ``original`` tag):
    what a later final label is compared with, organ by organ. For a ``LocalDatastoreHooks`` datastore
    (the local one, or the DICOMweb one's cache), changed under its ``record_writing``."""

    def save_preannotation(self, image_id: str, filename: str, info: Dict[str, Any]) -> None:
        """Keep ``filename`` as the image's pre-annotation, replacing the one kept before; written whole or
        not at all. Not checked as a final label is: the app's own infer made it on the image's grid, and it
        may be empty."""
        refuse_path_characters(image_id, "image id")
        _, ext = self.split_name(os.path.basename(filename))
        label_dir = self.record.label_path(PREANNOTATION)
        name = self.file_name(image_id, ext)
        with self.record_writing():
            obj = recorded_image(self.record, image_id)
            os.makedirs(label_dir, exist_ok=True)
            with atomic_path(os.path.join(label_dir, name)) as tmp:
                shutil.copyfile(filename, tmp)
            previous = obj.labels.get(PREANNOTATION)
            obj.labels[PREANNOTATION] = DataModel(info=dict(info, ts=int(time.time()), name=name), ext=ext)
            if previous is not None and previous.info.get("name") not in (None, name):
                _remove_quietly(os.path.join(label_dir, previous.info["name"]))

    def served_preannotation(self, image_id: str) -> Optional[Tuple[str, Dict]]:
        """(file, info) of the pre-annotation kept for the image; None when none is."""
        obj = self.record.objects.get(image_id)
        label = obj.labels.get(PREANNOTATION) if obj else None
        if label is None:
            return None
        path = os.path.join(self.record.label_path(PREANNOTATION), (label.info or {}).get("name") or self.file_name(image_id, label.ext))
        return (path, dict(label.info or {})) if os.path.isfile(path) else None


class CheckedLocalDatastore(LocalDatastoreHooks, PreannotationStore, LocalDatastore):
    """LocalDatastore whose ``save_label`` checks the label against its image first, and which takes no
    image id or label tag that names a path (MONAI Label joins both onto the studies folder).

    A refused label raises HTTP 422 with the reason (400 for a path) and leaves the datastore exactly
    as it was.

    Several processes write one datastore file: the server saves labels while MONAI Label's train
    subprocess (a round) stores importance scores. MONAI Label writes its in-memory copy whole, so a
    writer whose copy is older than the file erases what the other wrote (labels saved during a round
    vanished from the record when the round stored its scores). Here every change is made under the
    file lock on the file's current content, the reconcile with the files on disk included; a listing
    first reloads what another process wrote; and a record reloaded or reconciled is swapped in whole,
    so a listing made meanwhile (the file watcher of MONAI Label's auto reload runs on its own thread)
    sees every label saved before it.
    """

    def __init__(self, datastore_path: str, *args, allowed_labels: Iterable[int] = (), **kwargs):
        # One lock object per datastore: re-entrant in a thread (a reconcile reloads and writes under it),
        # exclusive across threads and processes. MONAI Label's own ``FileLock(...)`` calls each open a new
        # lock, which blocks even the thread that holds another.
        self._file_lock = FileLock(os.path.join(datastore_path, ".lock"))
        self._file_stat: Optional[tuple] = None  # of the datastore file as last read or written here
        super().__init__(datastore_path, *args, **kwargs)
        self.allowed_labels = sorted(int(a) for a in allowed_labels)
        # The organs a Submit Label may name as revised: the label set, in SuPreM order.
        self.label_names = [SUPREM_CLASSES[i - 1] for i in self.allowed_labels if 0 < i <= len(SUPREM_CLASSES)]
        # What Next Sample handed out at organ level (set by the app: the strategy's record); None: nothing.
        self.handouts: Optional[Handouts] = None

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        """MONAI Label's add, made on the file's current record under the lock (MONAI Label's adds to
        the record this process last read) and with the image written whole before it is listed."""
        image_id = image_id or self.split_name(os.path.basename(image_filename))[0]
        refuse_path_characters(image_id, "image id")
        _, image_ext = self.split_name(os.path.basename(image_filename))
        name = self.file_name(image_id, image_ext)
        with self.record_writing():
            with atomic_path(os.path.join(self.record.image_path(), name)) as tmp:
                shutil.copyfile(image_filename, tmp)
            info = dict(image_info or {}, ts=int(time.time()), name=name)
            objects = dict(self.record.objects, **{image_id: ImageLabelModel(image=DataModel(info=info, ext=image_ext))})
            self.record = self.record.model_copy(update={"objects": objects})  # swapped, not resized in place
        logger.info(f"image {image_id!r} added")
        return image_id

    def remove_image(self, image_id: str) -> None:
        """MONAI Label's removal, then the record reconciled at once (MONAI Label leaves that to its
        file watcher when auto reload is on, so the next listing still showed the image)."""
        self._known(image_id)
        super().remove_image(image_id)
        self.refresh()

    def remove_label(self, label_id: str, label_tag: str) -> None:
        self._known(label_id, label_tag)
        super().remove_label(label_id, label_tag)
        self.refresh()

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        self._known(label_id, label_tag)
        with self.record_writing():
            label = self.record.label(label_id, label_tag)
            if not label:
                raise NotInDatastore(f"image {label_id!r} has no {label_tag!r} label")
            label.info.update(info)

    def get_dataset_archive(self, limit_cases: Optional[int]) -> str:
        if not self.get_labeled_images():  # MONAI Label's assert: a 500 for a datastore with no final label yet
            raise NotInDatastore("no final labels yet: the dataset download holds images with their final labels")
        return super().get_dataset_archive(limit_cases)

    def _known(self, image_id: str, label_tag: Optional[str] = None) -> None:
        """HTTP 400 for an id or tag that names a path (MONAI Label joins both onto the studies folder: a
        removal would delete outside it), 404 naming what is not in the datastore (MONAI Label: a 500)."""
        refuse_path_characters(image_id, "image id")
        obj = recorded_image(self.record, image_id)
        if label_tag is not None and refuse_path_characters(label_tag, "label tag") not in obj.labels:
            raise NotInDatastore(f"image {image_id!r} has no {label_tag!r} label")

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        """Check, then store. A final label's params may name the organs revised (``{"revised": [...]}``;
        none named: every organ); the stored label is merged under the file lock so that organs revised
        by earlier saves keep their voxels (``lib.datastore.revisions``)."""
        refuse_path_characters(image_id, "image id")
        refuse_path_characters(label_tag, "label tag")
        image_path = self.get_image_uri(image_id)
        if not image_path:
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the datastore")
        params = dict(label_info or {})
        try:
            revised_now = requested_organs(params, self.label_names)
            summary = check_label(image_path, label_filename, self.allowed_labels)
        except (LabelError, RevisionError) as e:
            logger.warning(f"label for {image_id!r} refused: {e}")
            raise HTTPException(status_code=422, detail=f"label for {image_id!r} refused: {e}") from e
        if revised_now is None and label_tag == DefaultLabelTag.FINAL:  # OHIF, Slicer: no names sent
            classes = {n: CLASS_INDEX[n] for n in self.label_names}
            served = self.served_preannotation(image_id)
            revised_now, how = implied_organs(self.handouts, image_id, label_filename, params, served, classes)
            params.update(how)
        _, label_ext = self.split_name(os.path.basename(label_filename))
        label_dir = self.record.label_path(label_tag)
        name = self.file_name(image_id, label_ext)
        with self.record_writing():
            obj = recorded_image(self.record, image_id)
            ts = int(time.time())
            label_info = dict(params, checked=summary, ts=ts, name=name)
            dest = os.path.join(label_dir, name)
            if label_tag == DefaultLabelTag.FINAL:
                label_info.update(self._revise(obj, image_id, label_filename, dest, revised_now, params, ts))
            else:
                with atomic_path(dest) as tmp:
                    shutil.copyfile(label_filename, tmp)
            previous = obj.labels.get(label_tag)
            obj.labels[label_tag] = DataModel(info=label_info, ext=label_ext)
            if previous is not None and previous.info.get("name") not in (None, name):
                _remove_quietly(os.path.join(label_dir, previous.info["name"]))  # saved before in another format
        logger.info(f"label {label_tag!r} saved for {image_id!r}: {label_info['checked']}")
        return image_id

    def _revise(self, obj, image_id: str, label_filename: str, dest: str, revised_now, params: Dict, ts: int) -> Dict:
        """Write the merged final label to ``dest`` (caller holds the lock); return the info it adds:
        ``organs`` (per organ: revised or pseudo, when, who, on which models) and ``checked``."""
        names = self.label_names
        now = list(names) if revised_now is None else list(revised_now)
        previous = self._stored_organs(obj)
        before = set(revised_in(previous, names)) if previous is not None else set()
        keep = [CLASS_INDEX[n] for n in names if n in before and n not in now]
        client_id = saving_client(params)
        model = ((obj.image.info or {}).get(INFO_KEY) or {}).get("models")
        organs = organ_records(previous, now, names, ts, client_id, model)
        if not keep:  # nothing revised before survives this save: the new file is the label
            with atomic_path(dest) as tmp:
                shutil.copyfile(label_filename, tmp)
            return {ORGANS_KEY: organs}
        stored_name = obj.labels[DefaultLabelTag.FINAL].info.get("name") or os.path.basename(dest)
        stored, _ = _read(os.path.join(os.path.dirname(dest), stored_name), "stored label")
        new, _ = _read(label_filename, "label")
        merged = merge_label(_squeeze(new), _squeeze(stored), keep)
        _write_like(merged, label_filename, dest)
        values = [int(v) for v in np.unique(merged) if v]
        logger.info(f"{image_id}: revised now {now}; kept as revised before {[n for n in names if CLASS_INDEX[n] in keep]}")
        return {ORGANS_KEY: organs, "checked": {"values": values, "voxels": int(np.count_nonzero(merged))}}

    def _stored_organs(self, obj) -> Optional[Dict[str, Dict]]:
        """The final label's organ records; None without a final label; every organ revised for a final
        label saved whole (no records)."""
        final = obj.labels.get(DefaultLabelTag.FINAL)
        if final is None:
            return None
        organs = (final.info or {}).get(ORGANS_KEY)
        if organs:
            return organs
        who = (final.info or {}).get("client_id")
        return {n: {"state": REVISED, "ts": (final.info or {}).get("ts"), "client_id": who, "model": None} for n in self.label_names}

    def organs_of(self, image_id: str) -> Optional[Dict[str, Dict]]:
        """The image's per-organ revision records (in place, do not modify); None without a final label."""
        obj = self.record.objects.get(image_id)
        return self._stored_organs(obj) if obj else None

    def partly_revised_images(self) -> List[str]:
        """Images with a final label in which some organ is still a pseudo label."""
        out = []
        for image_id, obj in self.record.objects.items():
            final = obj.labels.get(DefaultLabelTag.FINAL)
            if final is not None and unrevised_in((final.info or {}).get(ORGANS_KEY), self.label_names):
                out.append(image_id)
        return out

    def revised_by_image(self) -> Dict[str, List[str]]:
        """Image file (real path, as ``datalist`` names it) -> the organs revised in its final label: what
        the trainer masks its loss with. Kept out of ``datalist``, whose every key MONAI Label takes for a
        file (the dataset download). Read it after ``datalist`` so that it covers every pair listed."""
        return revised_by_image(self, self.label_names)

    def datalist(self, full_path=True) -> List[Dict[str, Any]]:
        """MONAI Label's image/label pairs, as the file holds them now."""
        self.reload_record()
        return super().datalist(full_path)

    def json(self):
        """The whole record, as the file holds it now (a train or scoring process may have written it)."""
        self.reload_record()
        return super().json()

    def status(self) -> Dict[str, Any]:
        self.reload_record()
        return super().status()

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        with self.record_writing():
            obj = recorded_image(self.record, image_id)
            obj.image.info.update(info)

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        """MONAI Label's answer (a copy of the info, plus the image's path), copied through pickle:
        ``copy.deepcopy`` of a scored image's info costs ~0.4 ms, and MONAI Label's random strategy asks
        for every image's info on every request."""
        obj = self.record.objects.get(image_id)
        if not obj:
            return {}
        try:
            info = pickle.loads(pickle.dumps(obj.image.info, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception:  # something pickle cannot take: MONAI Label's way
            info = copy.deepcopy(obj.image.info)
        name = self.file_name(image_id, obj.image.ext)
        info["path"] = os.path.realpath(os.path.join(self.record.image_path(), name))
        return info

    def peek_image_info(self, image_id: str) -> Dict[str, Any]:
        """The image's info as held in memory, not copied: for readers that only look (a strategy ranking
        1,000 images per request; ``get_image_info`` deep-copies each one). Do not modify it."""
        obj = self.record.objects.get(image_id)
        return obj.image.info if obj else {}

    def write_record(self, lock: bool = True) -> None:
        """MONAI Label's write of the datastore file (in place, so its file watchers see it), serialised
        by pydantic: ``json.dumps(indent=2)`` runs the pure-Python encoder, about 0.3 s for 1,000 scored
        images, and MONAI Label writes the file on every Next Sample and every saved label."""
        with self._file_lock if lock else nullcontext():
            try:
                text = self.record.model_dump_json(exclude={"base_path"}, indent=2)
            except Exception:  # a value pydantic cannot serialise: MONAI Label's way (str() of it)
                text = json.dumps(self.record.model_dump(exclude={"base_path"}), indent=2, default=str)
            self.ignore_next_record_event()
            with uninterrupted():  # a stop signal must not leave the record truncated (stored scores lost)
                with open(self.record_path, "w") as f:
                    f.write(text)
            st = os.stat(self.record_path)
            self._file_stat = _stat_key(st)
            self.stamp_record(st.st_mtime)
            # The kernel stamps modification times at its clock tick (1-10 ms): a write by the next
            # holder of the lock within this tick could leave size and time alike, and its change unseen.
            time.sleep(max(0.0, st.st_mtime + _CLOCK_TICK_S - time.time()))

    @contextmanager
    def record_writing(self):
        """Hold the datastore lock, start from the file as it is now, and write the change back."""
        with self._file_lock:
            self._reload_if_changed()
            yield
            self.write_record(lock=False)

    def reload_record(self, throw_exception: bool = False) -> None:
        """MONAI Label's reload of the record from the file when another writer changed it, with this
        datastore's lock (MONAI Label's blocks a thread that holds this one) and change check."""
        try:
            with self._file_lock:
                self._reload_if_changed()
        except ValueError as e:
            logger.error(f"+++ Failed to load datastore => {e}")
            if throw_exception:
                raise

    def _reload_if_changed(self) -> None:
        """Replace the record with the file's when another writer changed the file (caller holds the
        lock). The record is swapped whole, never emptied and refilled: a reader meanwhile sees the old
        record or the new one."""
        path = self.record_path
        if not os.path.exists(path):
            return
        st = os.stat(path)
        if _stat_key(st) == self._file_stat:
            return
        with open(path) as f:
            model = LocalDatastoreModel.model_validate_json(f.read())
        model.base_path = self.studies_path
        self.record, self._file_stat = model, _stat_key(st)
        self.stamp_record(st.st_mtime)

    def reconcile(self) -> None:
        """MONAI Label's reconcile (images and labels added or removed on disk), under the lock on the
        file's current record, swapping in a new record only when something changed. MONAI Label's runs
        on the record this process last read and writes it back whole, so a train or scoring process
        starting up erased labels the server saved meanwhile, and it empties and refills the live record,
        so a listing meanwhile missed labels."""
        with self._file_lock:
            self._reload_if_changed()
            model = self.record
            label_tags = [t for t in os.listdir(model.label_path(None)) if os.path.isdir(model.label_path(t))]
            on_disk = {tag: self.matching_files(model.label_path(tag)) for tag in label_tags}
            new, changes = reconciled(
                model,
                image_names=set(os.listdir(model.image_path())),
                new_images=self.matching_files(model.image_path()),
                label_names={tag: set(os.listdir(model.label_path(tag))) for tag in label_tags},
                new_labels=on_disk,
                to_id=self.split_name,
            )
            logger.info(f"Invalidate count: {changes}")
            if changes:
                self.record = new
                self.write_record(lock=False)


_CLOCK_TICK_S = 0.01


def _stat_key(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_size, st.st_mtime_ns


def reconciled(model: LocalDatastoreModel, image_names, new_images, label_names, new_labels, to_id):
    """(a new record, number of changes): ``model`` without the images and labels whose files are gone
    (``image_names``, ``label_names[tag]``: the files in each folder) and with the image and label files
    not listed yet (``new_images``, ``new_labels[tag]``: the files matching the datastore's extensions).
    Objects that do not change are shared with ``model``; ``model`` itself is not changed."""
    now, changes, objects = int(time.time()), 0, {}
    for image_id, obj in model.objects.items():
        if image_id + obj.image.ext not in image_names:
            changes += 1
            continue
        labels = {t: lab for t, lab in obj.labels.items() if image_id + lab.ext in label_names.get(t, ())}
        changes += len(obj.labels) - len(labels)
        objects[image_id] = obj if len(labels) == len(obj.labels) else ImageLabelModel(image=obj.image, labels=labels)
    for name in new_images:
        image_id, ext = to_id(name)
        if image_id not in objects:
            objects[image_id] = ImageLabelModel(image=DataModel(info={"ts": now, "name": image_id + ext}, ext=ext))
            changes += 1
    for tag, names in new_labels.items():
        for name in names:
            label_id, ext = to_id(name)
            obj = objects.get(label_id)
            if obj is None or obj.labels.get(tag):
                continue
            labels = dict(obj.labels, **{tag: DataModel(info={"ts": now, "name": label_id + ext}, ext=ext)})
            objects[label_id] = ImageLabelModel(image=obj.image, labels=labels)
            changes += 1
    if not changes:
        return model, 0
    new = model.model_copy(update={"objects": objects})
    new.base_path = model.base_path
    return new, changes


def _squeeze(label: np.ndarray) -> np.ndarray:
    return label[..., 0] if label.ndim == 4 and label.shape[-1] == 1 else label


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _write_like(label: np.ndarray, like: str, dest: str) -> None:
    """Write ``label`` (X, Y, Z) in the format and geometry of the file ``like``, whole or not at all."""
    if like.endswith((".nii", ".nii.gz")):
        img = nib.load(like)
        dtype = img.get_data_dtype()
        out = type(img)(label.astype(dtype if np.issubdtype(dtype, np.integer) else np.uint8), img.affine, img.header)
        out.header.set_slope_inter(1, 0)
        data = out.to_bytes()
        with atomic_open(dest, "wb") as f:
            f.write(gzip.compress(data) if dest.endswith(".gz") else data)
        return
    import itk

    ref = itk.imread(like)
    img = itk.image_from_array(np.ascontiguousarray(label.T.astype(np.uint8)))  # itk is z, y, x
    img.CopyInformation(ref)
    with tempfile.TemporaryDirectory() as folder:  # itk picks the writer by the file's extension
        written = os.path.join(folder, os.path.basename(dest))
        itk.imwrite(img, written, compression=True)
        with atomic_path(dest) as tmp:
            shutil.copyfile(written, tmp)
