"""The checked local datastore, used from two processes at once: the server and a round's subprocess."""

from __future__ import annotations

import json

from lib.datastore import CheckedLocalDatastore, labeled_images_now
from support import tiny_studies


def _open(studies):
    # Two instances on one folder behave as two processes do: each has its own copy of the record.
    return CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"], allowed_labels=range(1, 26))


def test_a_stale_writer_does_not_erase_a_label_saved_by_another_process(tmp_path):
    studies, label = tiny_studies(tmp_path)
    server, round_process = _open(studies), _open(studies)
    server.save_label("im0", label, "final", {"client_id": "annotator-1"})
    # The round's copy predates the save; it stores a score as the importance scoring does.
    round_process.update_image_info("im1", {"importance": {"score": 7}})
    record = json.load(open(studies / "datastore_v2.json"))["objects"]
    assert record["im0"]["labels"]["final"]["info"]["client_id"] == "annotator-1"
    assert record["im0"]["labels"]["final"]["info"]["checked"]["voxels"] == 6 * 6 * 5
    assert record["im1"]["image"]["info"]["importance"] == {"score": 7}
    # And the other way round: the server's next save keeps the round's score.
    server.save_label("im2", label, "final", {})
    record = json.load(open(studies / "datastore_v2.json"))["objects"]
    assert record["im1"]["image"]["info"]["importance"] == {"score": 7}
    assert set(k for k, v in record.items() if v["labels"].get("final")) == {"im0", "im2"}


def test_labeled_images_now_sees_labels_saved_by_another_process(tmp_path):
    studies, label = tiny_studies(tmp_path)
    server, round_process = _open(studies), _open(studies)
    assert labeled_images_now(round_process) == []
    server.save_label("im0", label, "final", {})
    assert round_process.get_labeled_images() == [], "a plain read is this process's copy"
    assert labeled_images_now(round_process) == ["im0"]
    assert "checked" in round_process.get_label_info("im0", "final")


def _dicomweb_on_a_fake_pacs(tmp_path, monkeypatch):
    """The app's DICOMweb datastore with image ``im0`` in its cache, on a PACS that stands in for STOW: the
    SEG MONAI Label would write is not made, its upload is counted (``uploads``). Organ ``liver`` and
    ``spleen`` handed out to ``annotator-1`` for ``im0``."""
    import shutil

    import monailabel.datastore.dicom as monailabel_dicom
    from monailabel.utils.others.generic import md5_digest

    from lib.classes import LABEL_SETS, label_dict
    from lib.datastore.dicomweb import CheckedDICOMWebDatastore

    studies, label = tiny_studies(tmp_path, n=1)

    class Pacs:  # what DICOMWebDatastore asks of its client before any request
        base_url = "http://pacs.invalid/dicom-web"

    cache = tmp_path / "cache" / md5_digest(Pacs.base_url)
    (cache / "im0").mkdir(parents=True)
    (cache / "im0" / "1.dcm").write_bytes(b"")  # the series as downloaded: nothing to fetch
    shutil.copyfile(studies / "im0.nii.gz", cache / "im0.nii.gz")
    uploads = []

    def seg_file(image_dir, label, info):  # MONAI Label deletes it once uploaded
        (tmp_path / "seg.dcm").write_bytes(b"")
        return str(tmp_path / "seg.dcm")

    monkeypatch.setattr(monailabel_dicom, "nifti_to_dicom_seg", seg_file)
    monkeypatch.setattr(monailabel_dicom, "dicom_web_upload_dcm", lambda f, client: uploads.append(f) or "1.2.3.4")
    ds = CheckedDICOMWebDatastore(Pacs(), {}, cache_path=str(tmp_path / "cache")).set_labels(
        label_dict(LABEL_SETS["atlas25"])
    )
    ds.handouts = lambda client, image: ["liver", "spleen"] if (client, image) == ("annotator-1", "im0") else None
    return ds, label, uploads


def test_dicomweb_records_a_partial_revision_as_sent_and_refuses_unknown_organs_before_the_pacs(tmp_path, monkeypatch):
    import pytest
    from fastapi import HTTPException

    ds, label, uploads = _dicomweb_on_a_fake_pacs(tmp_path, monkeypatch)
    with pytest.raises(HTTPException) as e:
        ds.save_label("im0", label, "final", {"client_id": "annotator-1", "revised": ["liver", "brain"]})
    assert e.value.status_code == 422 and "brain" in e.value.detail and uploads == []

    def revised():
        organs = ds.get_label_info("im0", "final")["organs"]
        return sorted(n for n, r in organs.items() if r["state"] == "revised")

    # Named: exactly those organs, though others were handed out to the annotator (the param overrides).
    ds.save_label("im0", label, "final", {"client_id": "annotator-1", "revised": ["pancreas", "liver"]})
    assert len(uploads) == 1, "the label did not go to the PACS"
    assert revised() == ["liver", "pancreas"]
    assert "revised_from" not in ds.get_label_info("im0", "final")
    # Named none: the organs handed out (no pre-annotation was served to compare with).
    ds.save_label("im0", label, "final", {"client_id": "annotator-1"})
    assert revised() == ["liver", "spleen"]
    assert ds.get_label_info("im0", "final")["revised_from"] == {"handed_out": ["liver", "spleen"], "changed": None}
    # Every organ named: a whole-volume revision, no organ records, as before.
    ds.save_label("im0", label, "final", {"client_id": "annotator-1", "revised": list(ds.label_names.values())})
    assert "organs" not in ds.get_label_info("im0", "final") and len(uploads) == 3


def test_a_reconcile_in_another_process_does_not_erase_a_label_saved_meanwhile(tmp_path):
    import shutil
    import threading

    studies, label = tiny_studies(tmp_path)
    server, scoring_process = _open(studies), _open(studies)
    shutil.copyfile(studies / "im0.nii.gz", studies / "im9.nii.gz")  # a study added: the reconcile has work
    write = scoring_process.write_record
    saving = []

    def save_while_reconciling(lock=True):  # the server's save lands between the reconcile's read and write
        if not saving:
            saving.append(threading.Thread(target=server.save_label, args=("im0", label, "final", {"client_id": "a-1"})))
            saving[0].start()
            saving[0].join(timeout=1.0)  # held off by the reconcile's lock, or already done
        return write(lock)

    scoring_process.write_record = save_while_reconciling
    scoring_process.refresh()
    saving[0].join()
    record = json.load(open(studies / "datastore_v2.json"))["objects"]
    assert "im9" in record
    assert record["im0"]["labels"]["final"]["info"]["client_id"] == "a-1"
    assert "final" in server.json()["objects"]["im0"]["labels"]


def test_reconcile_builds_a_new_record_and_leaves_the_one_being_read_whole(tmp_path):
    studies, label = tiny_studies(tmp_path)
    ds = _open(studies)
    ds.save_label("im0", label, "final", {})
    ds.save_label("im1", label, "final", {})
    before = ds.record  # what a listing in another thread is reading
    (studies / "labels" / "final" / "im1.nii.gz").unlink()
    (studies / "im2.nii.gz").unlink()
    ds.refresh()
    assert sorted(k for k, v in before.objects.items() if v.labels.get("final")) == ["im0", "im1"]
    assert sorted(before.objects) == ["im0", "im1", "im2"]
    assert ds.get_labeled_images() == ["im0"] and sorted(ds.list_images()) == ["im0", "im1"]
    assert sorted(json.load(open(studies / "datastore_v2.json"))["objects"]) == ["im0", "im1"]


def test_datalist_items_are_image_label_pairs_and_revised_organs_come_apart(tmp_path):
    import os

    studies, label = tiny_studies(tmp_path)
    ds = _open(studies)
    ds.save_label("im1", label, "final", {"revised": ["liver"]})
    ds.save_label("im2", label, "final", {})
    # The record's order and the datalist's need not agree: reversed here on purpose.
    ds.record.objects = dict(reversed(list(ds.record.objects.items())))
    items = ds.datalist()
    assert all(set(d) == {"image", "label"} for d in items) and len(items) == 2
    revised = ds.revised_by_image()
    by_name = {os.path.basename(d["image"]): revised[os.path.realpath(d["image"])] for d in items}
    assert by_name["im1.nii.gz"] == ["liver"]
    assert by_name["im2.nii.gz"] == ds.label_names


def test_a_final_label_naming_no_organs_counts_the_organs_handed_out_and_those_changed_from_the_pre_annotation(tmp_path):
    import nibabel as nib
    import numpy as np

    from lib.classes import CLASS_INDEX

    studies, label = tiny_studies(tmp_path)
    ds = _open(studies)
    ds.handouts = lambda client, image: ["pancreas", "aorta"] if (client, image) == ("a-1", "im0") else None
    ref = nib.load(label)
    served = np.asarray(ref.dataobj).copy()  # the model's liver (tiny_studies) and a stomach
    served[10:14, 10:14, 2:6] = CLASS_INDEX["stomach"]
    nib.save(nib.Nifti1Image(served, ref.affine), str(tmp_path / "served.nii.gz"))
    ds.save_preannotation("im0", str(tmp_path / "served.nii.gz"), {"client_id": "a-1", "model": "segresnet"})
    assert ds.json()["objects"]["im0"]["labels"]["original"]["info"]["client_id"] == "a-1"
    new = served.copy()
    new[4, 4, 3] = 0  # the annotator fixed one liver voxel; the stomach is as served
    nib.save(nib.Nifti1Image(new, ref.affine), str(tmp_path / "new.nii.gz"))
    label_info = [{"name": "liver", "idx": CLASS_INDEX["liver"]}, {"name": "stomach", "idx": CLASS_INDEX["stomach"]}]
    ds.save_label("im0", str(tmp_path / "new.nii.gz"), "final", {"client_id": "a-1", "label_info": label_info})
    organs = ds.organs_of("im0")
    assert sorted(n for n, r in organs.items() if r["state"] == "revised") == ["aorta", "liver", "pancreas"]
    assert ds.get_label_info("im0", "final")["revised_from"] == {"handed_out": ["pancreas", "aorta"], "changed": ["liver"]}
    # Another annotator, handed nothing: a whole-volume save, as before (the pre-annotation is not theirs).
    ds.save_label("im1", str(tmp_path / "new.nii.gz"), "final", {"client_id": "a-2", "label_info": label_info})
    assert {r["state"] for r in ds.organs_of("im1").values()} == {"revised"}
    assert "revised_from" not in ds.get_label_info("im1", "final")
