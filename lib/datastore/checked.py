"""Refuse a label that does not fit its image before MONAI Label writes it into the datastore."""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from lib.errors import refuse_path_characters

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


class CheckedLocalDatastore(LocalDatastore):
    """LocalDatastore whose ``save_label`` checks the label against its image first, and which takes no
    image id or label tag that names a path (MONAI Label joins both onto the studies folder).

    A refused label raises HTTP 422 with the reason (400 for a path) and leaves the datastore exactly
    as it was.
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
        return super().save_label(image_id, label_filename, label_tag, label_info)
