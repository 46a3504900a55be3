"""Refuse a label that does not fit its image before MONAI Label writes it into the datastore."""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import shutil
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterable, List

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.exception import ImageNotFoundException

from lib.errors import refuse_path_characters
from lib.stopping import uninterrupted

logger = logging.getLogger(__name__)


class LabelError(ValueError):
    """A label the datastore must not take (shape, geometry, values, empty)."""


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


class CheckedLocalDatastore(LocalDatastore):
    """LocalDatastore whose ``save_label`` checks the label against its image first, and which takes no
    image id or label tag that names a path (MONAI Label joins both onto the studies folder).

    A refused label raises HTTP 422 with the reason (400 for a path) and leaves the datastore exactly
    as it was.

    Several processes write one datastore file: the server saves labels while MONAI Label's train
    subprocess (a round) stores importance scores. MONAI Label writes its in-memory copy whole, so a
    writer whose copy is older than the file erases what the other wrote (labels saved during a round
    vanished from the record when the round stored its scores). Here every change is made under the
    file lock on the file's current content.
    """

    def __init__(self, *args, allowed_labels: Iterable[int] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.allowed_labels = sorted(int(a) for a in allowed_labels)

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        if image_id:
            refuse_path_characters(image_id, "image id")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        refuse_path_characters(image_id, "image id")
        refuse_path_characters(label_tag, "label tag")
        image_path = self.get_image_uri(image_id)
        if not image_path:
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the datastore")
        try:
            summary = check_label(image_path, label_filename, self.allowed_labels)
        except LabelError as e:
            logger.warning(f"label for {image_id!r} refused: {e}")
            raise HTTPException(status_code=422, detail=f"label for {image_id!r} refused: {e}") from e
        label_info = dict(label_info or {}, checked=summary)
        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_dir = self._datastore.label_path(label_tag)
        with self._writing():
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            os.makedirs(label_dir, exist_ok=True)
            shutil.copy(label_filename, os.path.join(label_dir, self._filename(image_id, label_ext)))
            label_info.update({"ts": int(time.time()), "name": self._filename(image_id, label_ext)})
            obj.labels[label_tag] = DataModel(info=label_info, ext=label_ext)
        logger.info(f"label {label_tag!r} saved for {image_id!r}: {summary}")
        return image_id

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        with self._writing():
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            obj.image.info.update(info)

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        """MONAI Label's answer (a copy of the info, plus the image's path), copied through pickle:
        ``copy.deepcopy`` of a scored image's info costs ~0.4 ms, and MONAI Label's random strategy asks
        for every image's info on every request."""
        obj = self._datastore.objects.get(image_id)
        if not obj:
            return {}
        try:
            info = pickle.loads(pickle.dumps(obj.image.info, protocol=pickle.HIGHEST_PROTOCOL))
        except Exception:  # something pickle cannot take: MONAI Label's way
            info = copy.deepcopy(obj.image.info)
        name = self._filename(image_id, obj.image.ext)
        info["path"] = os.path.realpath(os.path.join(self._datastore.image_path(), name))
        return info

    def peek_image_info(self, image_id: str) -> Dict[str, Any]:
        """The image's info as held in memory, not copied: for readers that only look (a strategy ranking
        1,000 images per request; ``get_image_info`` deep-copies each one). Do not modify it."""
        obj = self._datastore.objects.get(image_id)
        return obj.image.info if obj else {}

    def _update_datastore_file(self, lock=True):
        """MONAI Label's write of the datastore file (in place, so its file watchers see it), serialised
        by pydantic: ``json.dumps(indent=2)`` runs the pure-Python encoder, about 0.3 s for 1,000 scored
        images, and MONAI Label writes the file on every Next Sample and every saved label."""

        def write():
            try:
                text = self._datastore.model_dump_json(exclude={"base_path"}, indent=2)
            except Exception:  # a value pydantic cannot serialise: MONAI Label's way (str() of it)
                text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            self._ignore_event_config = True
            with uninterrupted():  # a stop signal must not leave the record truncated (stored scores lost)
                with open(self._datastore_config_path, "w") as f:
                    f.write(text)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    @contextmanager
    def _writing(self):
        """Hold the datastore lock, start from the file as it is now, and write the change back."""
        with FileLock(self._lock_file):
            self._reload_if_changed()
            yield
            self._update_datastore_file(lock=False)

    def _reload_if_changed(self) -> None:
        """MONAI Label's reload from the datastore file when another writer changed it (caller holds the
        lock; MONAI Label's own reload takes it and would wait on us)."""
        path = self._datastore_config_path
        if not os.path.exists(path):
            return
        ts = os.stat(path).st_mtime
        if ts == self._config_ts:
            return
        with open(path) as f:
            model = LocalDatastoreModel.model_validate_json(f.read())
        model.base_path = self._datastore_path
        self._datastore, self._config_ts = model, ts
