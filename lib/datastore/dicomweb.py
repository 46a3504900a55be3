"""MONAI Label's DICOMweb datastore, with the app's label checks, segment names and class indices."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Dict, Mapping

from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.monailabel_private import LocalDatastoreHooks, dicomweb_keeps_nifti, dicomweb_label_info
from lib.monailabel_private import download_dicomweb_series

from .checked import LabelError, check_label
from .revisions import RevisionError, requested_organs

logger = logging.getLogger(__name__)


def _segment_info(names: Mapping[int, str], values) -> list:
    """``label_info`` for MONAI Label's nifti_to_dicom_seg: one entry per label value, in sorted order
    (it pairs entries with the label's sorted non-zero values by position)."""
    from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS

    info = []
    for v in sorted(values):
        name = names[int(v)]
        entry: Dict[str, Any] = {"name": name, "description": name.replace("_", " "), "idx": int(v)}
        color = GENERIC_ANATOMY_COLORS.get(name.replace("_", " "))
        if color:
            entry["color"] = list(color)[:3]
        info.append(entry)
    if info:
        # MONAI Label takes the SEG's series description from the first entry (else "AIName").
        info[0]["model_name"] = "SuPreM revised label"
    return info


class CheckedDICOMWebDatastore(LocalDatastoreHooks, DICOMWebDatastore):
    """DICOMWebDatastore that (1) refuses a label that does not fit its image before anything reaches the
    PACS, (2) names the DICOM SEG segments from the app's label table, (3) sees its own saves (MONAI
    Label caches the labelled-series list for hours), and (4) reads a DICOM SEG back as the app's class
    indices (MONAI Label's reader yields segment numbers 1..n)."""

    label_names: Dict[int, str] = {}

    def set_labels(self, label_dict: Mapping[str, int]) -> "CheckedDICOMWebDatastore":
        self.label_names = {int(v): n for n, v in label_dict.items()}
        return self

    @staticmethod
    def forget_cached_lists():
        for fn in (DICOMWebDatastore.get_labeled_images, DICOMWebDatastore.list_images):
            fn.cache_clear()

    def save_label(self, image_id, label_filename, label_tag, label_info, label_id=""):
        from monailabel.datastore.utils.convert import binary_to_image

        self._refuse_partial_revision(image_id, label_info)
        image_path = self.get_image_uri(image_id)
        converted = ""
        if label_filename.endswith(".bin") and os.path.isfile(image_path):
            converted = label_filename = binary_to_image(image_path, label_filename)
        try:
            if os.path.isfile(image_path):
                try:
                    summary = check_label(image_path, label_filename, sorted(self.label_names))
                except LabelError as e:
                    logger.warning(f"label for {image_id!r} refused: {e}")
                    raise HTTPException(status_code=422, detail=f"label for {image_id!r} refused: {e}") from e
                label_info = dict(label_info or {}, checked=summary)
                label_info["label_info"] = _segment_info(self.label_names, summary["values"])
            try:
                return super().save_label(image_id, label_filename, label_tag, label_info)
            except FileNotFoundError as e:  # nifti_to_dicom_seg ignores itkimage2segimage's exit status
                raise HTTPException(
                    status_code=500, detail=f"could not write the DICOM SEG for {image_id!r} (itkimage2segimage failed)"
                ) from e
        finally:
            self.forget_cached_lists()
            if converted and os.path.exists(converted):
                os.unlink(converted)

    def _refuse_partial_revision(self, image_id, params) -> None:
        """Organ-level revision needs the stored label and its per-organ records, which a PACS does not
        keep: a Submit Label naming only some organs gets a 422 (unknown names too); none named, or every
        organ of the label set, is a whole-volume revision, as always."""
        names = [self.label_names[v] for v in sorted(self.label_names)]
        try:
            revised = requested_organs(params or {}, names)
        except RevisionError as e:
            raise HTTPException(status_code=422, detail=f"label for {image_id!r} refused: {e}") from e
        if revised is not None and len(revised) < len(names):
            raise HTTPException(
                status_code=422,
                detail=f"label for {image_id!r} refused: organ-level revision ('revised': {', '.join(revised)}) is "
                "not supported on a DICOMweb datastore; save the whole volume (leave 'revised' out)",
            )

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if label_tag != DefaultLabelTag.FINAL or not dicomweb_keeps_nifti(self) or not image_id:
            return super().get_label_uri(label_id, label_tag, image_id)
        final = os.path.realpath(os.path.join(self.record.label_path(label_tag), f"{image_id}.nii.gz"))
        if os.path.exists(final):
            return final
        label_dir = os.path.realpath(os.path.join(self.record.label_path(label_tag), label_id))
        if not os.path.exists(label_dir) or not os.listdir(label_dir):
            download_dicomweb_series(self, label_id, label_dir)
        out = self._seg_to_classes(os.path.join(label_dir, sorted(os.listdir(label_dir))[0]), self.get_image_uri(image_id))
        try:
            LocalDatastore.save_label(self, image_id, out, label_tag, dicomweb_label_info(self, label_id))
        finally:
            os.unlink(out)
        return final

    def _seg_to_classes(self, seg_file: str, image_path: str) -> str:
        """The SEG as a label map on the image's grid whose values are the app's class indices."""
        import numpy as np
        import pydicom
        import pydicom_seg
        import SimpleITK as sitk

        dcm = pydicom.dcmread(seg_file)
        by_name = {n: v for v, n in self.label_names.items()}
        lut = np.zeros(max([int(s.SegmentNumber) for s in dcm.SegmentSequence] + [0]) + 1, np.uint8)
        for s in dcm.SegmentSequence:
            name = str(s.SegmentLabel)
            if name not in by_name:
                logger.warning(f"DICOM SEG segment {int(s.SegmentNumber)} {name!r} is no class of this app: dropped")
            lut[int(s.SegmentNumber)] = by_name.get(name, 0)
        seg = pydicom_seg.MultiClassReader().read(dcm).image
        mapped = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(seg).astype(np.int64)])
        mapped.CopyInformation(seg)
        ref = sitk.ReadImage(image_path)
        on_grid = sitk.Resample(mapped, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        out = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        sitk.WriteImage(on_grid, out, True)
        return out
