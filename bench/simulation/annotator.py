"""The simulated annotator: revises a volume by writing its final label into the datastore.

Whole-volume revision: the final label is the ground truth of the app's organs. Organ-level revision: the model's
prediction, with the listed organs replaced by their ground truth (voxels the model gave to a listed
organ are cleared, then the organ's true voxels painted); the other organs keep the model's answer,
and the save names the listed organs as ``revised`` (the app's datastore then keeps organs revised
earlier and the trainer learns from the revised organs only).
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import nibabel as nib
import numpy as np

from lib.classes import CLASS_INDEX


def organ_revision(pred: np.ndarray, gt: np.ndarray, organs: Sequence[str]) -> np.ndarray:
    """``pred`` with each organ of ``organs`` replaced by its ground truth."""
    out = np.asarray(pred, np.uint8).copy()
    for o in organs:
        c = CLASS_INDEX[o]
        out[out == c] = 0
        out[gt == c] = c
    return out


class SimulatedAnnotator:
    """Revises images of a datastore from ground-truth files.

    gt: image id -> ground-truth label file; labels: the app's organs (a whole volume counts as
    revising all of them); predict: image path -> label map on the input grid (the model now served).
    """

    def __init__(self, gt: Dict[str, str], labels: Sequence[str], predict: Callable[[str], np.ndarray], tmp_dir: str):
        self.gt = dict(gt)
        self.labels = list(labels)
        self.predict = predict
        self.tmp_dir = tmp_dir
        os.makedirs(tmp_dir, exist_ok=True)

    def revise(self, datastore, image_id: str, organs: Optional[List[str]] = None) -> int:
        """Save the revised final label of ``image_id``; returns how many organs were revised.

        organs None: the whole volume; otherwise only those organs (organ-level revision).
        """
        gt_img = nib.load(self.gt[image_id])
        gt = np.asarray(gt_img.dataobj)
        if organs is None:  # the ground truth of the app's organs (the app refuses other classes)
            label = np.where(np.isin(gt, [CLASS_INDEX[o] for o in self.labels]), gt, 0).astype(np.uint8)
            self._save(datastore, image_id, label, gt_img.affine, {"revision": "volume"})
            return len(self.labels)
        organs = [o for o in organs if o in CLASS_INDEX]
        if not organs:  # nothing flagged: nothing to revise (the app refuses an empty list)
            return 0
        label = organ_revision(self.predict(datastore.get_image_uri(image_id)), gt, organs)
        # The app's Submit Label params: only these organs were revised; the rest is the model's answer.
        self._save(datastore, image_id, label, gt_img.affine, {"revision": "organ", "revised": list(organs)})
        return len(organs)

    def _save(self, datastore, image_id: str, label: np.ndarray, affine, params: Dict) -> None:
        tmp = os.path.join(self.tmp_dir, f"{image_id}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), tmp)
        try:
            datastore.save_label(image_id, tmp, "final", params)
        finally:
            os.remove(tmp)
