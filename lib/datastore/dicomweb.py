"""MONAI Label's DICOMweb datastore, with the app's label checks, segment names and class indices."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.importance.records import INFO_KEY
from lib.monailabel_private import LocalDatastoreHooks, dicomweb_client, dicomweb_keeps_nifti, dicomweb_label_info
from lib.monailabel_private import download_dicomweb_series

from .checked import Handouts, LabelError, PreannotationStore, check_label, implied_organs
from .checked import revised_by_image, saving_client
from .revisions import ORGANS_KEY, RevisionError, organ_records, requested_organs

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


class CheckedDICOMWebDatastore(LocalDatastoreHooks, PreannotationStore, DICOMWebDatastore):
    """DICOMWebDatastore that (1) refuses a label that does not fit its image before anything reaches the
    PACS, (2) names the DICOM SEG segments from the app's label table, (3) sees its own saves (MONAI
    Label caches the labelled-series list for hours), and (4) reads a DICOM SEG back as the app's class
    indices (MONAI Label's reader yields segment numbers 1..n)."""

    label_names: Dict[int, str] = {}
    # What Next Sample handed out at organ level (set by the app: the strategy's record); None: nothing.
    handouts: Optional[Handouts] = None
    # OHIF's MONAI Label panel sends no client id: hand-outs to requests that said nobody count for saves
    # (and SEGs read from the PACS) that say nobody either (``ImportanceStrategy.organs_handed_to``).
    anonymous_handouts = True

    def set_labels(self, label_dict: Mapping[str, int]) -> "CheckedDICOMWebDatastore":
        self.label_names = {int(v): n for n, v in label_dict.items()}
        return self

    @staticmethod
    def forget_cached_lists():
        for fn in (DICOMWebDatastore.get_labeled_images, DICOMWebDatastore.list_images):
            fn.cache_clear()

    def save_label(self, image_id, label_filename, label_tag, label_info, label_id=""):
        from monailabel.datastore.utils.convert import binary_to_image

        self._refuse_unknown_organs(image_id, label_info)
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
                if label_tag == DefaultLabelTag.FINAL:
                    label_info.update(self._revision_info(image_id, label_filename, label_info))
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

    def _refuse_unknown_organs(self, image_id, params) -> None:
        """A ``revised`` param naming organs outside the label set (or not a list of names) gets a 422
        naming them, before anything reaches the PACS."""
        try:
            requested_organs(params or {}, self._names())
        except RevisionError as e:
            raise HTTPException(status_code=422, detail=f"label for {image_id!r} refused: {e}") from e

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if label_tag != DefaultLabelTag.FINAL or not dicomweb_keeps_nifti(self) or not image_id:
            return super().get_label_uri(label_id, label_tag, image_id)
        final = self._cached_final(image_id)
        if os.path.exists(final):
            return final
        label_dir = os.path.realpath(os.path.join(self.record.label_path(label_tag), label_id))
        if not os.path.exists(label_dir) or not os.listdir(label_dir):
            download_dicomweb_series(self, label_id, label_dir)
        out = self._seg_to_classes(os.path.join(label_dir, sorted(os.listdir(label_dir))[0]), self.get_image_uri(image_id))
        try:  # a SEG says nobody: the organs handed out to requests that said nobody count (OHIF's export)
            info = dict(dicomweb_label_info(self, label_id), **self._revision_info(image_id, out, {}))
            LocalDatastore.save_label(self, image_id, out, label_tag, info)
        finally:
            os.unlink(out)
        return final

    def _cached_final(self, image_id: str) -> str:
        """Where the server's cache keeps the image's final label (NIfTI, the app's class indices)."""
        return os.path.realpath(os.path.join(self.record.label_path(DefaultLabelTag.FINAL), f"{image_id}.nii.gz"))

    def _names(self) -> List[str]:
        return [self.label_names[v] for v in sorted(self.label_names)]

    def _revision_info(self, image_id: str, label_file: str, params: Mapping) -> Dict:
        """The organ records a final label gets: the organs its params name as revised (``revised``, some of
        the label set: recorded as sent, whatever was handed out or changed), else those
        ``checked.implied_organs`` finds (handed out, changed against the served pre-annotation; with
        ``revised_from``); {} for a whole-volume revision (every organ named, or none named and nothing
        handed out). A PACS keeps whole SEGs, so nothing is merged with an earlier label: the records
        describe this label alone (the organs not revised in it are pseudo)."""
        classes = {self.label_names[v]: v for v in sorted(self.label_names)}
        how: Dict = {}
        revised = requested_organs(params, list(classes))
        if revised is None:
            served = self.served_preannotation(image_id)
            revised, how = implied_organs(self.handouts, image_id, label_file, params, served, classes)
        elif len(revised) == len(classes):
            return {}
        if revised is None:
            return {}
        model = ((self.get_image_info(image_id) or {}).get(INFO_KEY) or {}).get("models")
        organs = organ_records(None, revised, list(classes), int(time.time()), saving_client(params), model)
        return dict(how, **{ORGANS_KEY: organs})

    def read_new_label(self, image_id: str) -> bool:
        """Read the image's DICOM SEG now if the PACS has one this server has not read (OHIF's export
        stores it there without telling the server; MONAI Label's listing of labelled series is cached for
        hours). Next Sample calls this for the images it holds, so the hand-out is open when the SEG is
        read. True when a SEG was read; a PACS that does not answer is logged."""
        if not self.label_names or not dicomweb_keeps_nifti(self):
            return False
        if os.path.exists(self._cached_final(image_id)):
            return False
        try:
            segs = self._segs_of(image_id)
            if segs:
                self.forget_cached_lists()
                self.get_label_uri(segs[-1], DefaultLabelTag.FINAL, image_id)
        except Exception as e:  # noqa: BLE001 - Next Sample still answers
            logger.warning(f"{image_id}: could not look for a new DICOM SEG: {e}")
            return False
        return bool(segs)

    def _segs_of(self, image_id: str) -> List[str]:
        """The SEG series in the PACS that reference series ``image_id``, oldest first."""
        from pydicom.dataset import Dataset

        client = dicomweb_client(self)
        study = (self.get_image_info(image_id) or {}).get("StudyInstanceUID")
        filters = dict({"Modality": "SEG"}, **({"StudyInstanceUID": study} if study and study != "UNK" else {}))
        found: List[Tuple[str, str]] = []
        for found_series in client.search_for_series(search_filters=filters):
            seg = Dataset.from_json(found_series)
            referenced, when = self._seg_reference(client, str(seg.StudyInstanceUID), str(seg.SeriesInstanceUID))
            if referenced == image_id:
                found.append((when, str(seg.SeriesInstanceUID)))
        return [uid for _, uid in sorted(found)]

    def _seg_reference(self, client, study_uid: str, seg_uid: str) -> Tuple[str, str]:
        """(the series a SEG references, its series date and time), from the SEG's metadata, asked of the
        PACS once per SEG: a stored series does not change, and Next Sample looks at every held image's
        study at every call."""
        from pydicom.dataset import Dataset

        known = self.__dict__.setdefault("_seg_references", {})
        if seg_uid not in known:
            meta = Dataset.from_json(client.retrieve_series_metadata(study_uid, seg_uid)[0])
            ref = meta.get("ReferencedSeriesSequence")
            referenced = str(ref[0].get("SeriesInstanceUID", "")) if ref else ""
            known[seg_uid] = (referenced, f"{meta.get('SeriesDate', '')}{meta.get('SeriesTime', '')}")
        return known[seg_uid]

    def revised_by_image(self) -> Dict[str, List[str]]:
        """Image file (real path, as ``datalist`` names it) -> the organs revised in its final label (every
        organ for a label without records): what the trainer masks its loss with."""
        return revised_by_image(self, self._names())

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
