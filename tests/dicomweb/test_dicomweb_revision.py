"""Organ-level revision on a DICOMweb datastore (a real Orthanc, a real server with ``organs_per_sample 2``).

A final label that names no organs counts as revised the organs Next Sample handed out for its image and
the organs changed against the pre-annotation served for it: saved through MONAI Label's client with its
own ``label_info`` (3D Slicer's way), or stored straight in the PACS as a DICOM SEG by STOW through the
server's /proxy/dicom, as OHIF's export does, after a Next Sample that said nobody (OHIF's panel). A save
without a hand-out stays a whole-volume revision; a save naming some organs (``revised``) records exactly
those. The PACS holds two copies of the shared series.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from dicomweb_support import dicomweb_server, loaded_orthanc, orthanc_missing, trainer_view
from lib.classes import CLASS_INDEX, LABEL_SETS
from lib.importance.records import INFO_KEY, is_scored
from support import shared_path

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(orthanc_missing() is not None, reason=orthanc_missing() or ""),
    pytest.mark.timeout(900),
]

ORGANS = LABEL_SETS["atlas25"]
NAMES = {v: n for n, v in CLASS_INDEX.items()}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    series_dir = shared_path("data", "totalseg-example", "dicom")
    with loaded_orthanc(str(tmp_path_factory.mktemp("orthanc")), series_dir, copies=2) as o:
        yield o


@pytest.fixture(scope="module")
def server(orthanc, tmp_path_factory):
    env = {"MONAI_LABEL_TASKS_TRAIN": "false"}
    with dicomweb_server(orthanc, tmp_path_factory.mktemp("server"), env=env, organs_per_sample="2") as srv:
        yield srv


@pytest.fixture(scope="module")
def scored(server, orthanc):
    """Both series scored (the server's own scoring, run to its end here), so Next Sample names organs."""
    request = urllib.request.Request(server.url + "/scoring/importance?run_sync=true", data=b"{}", method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        urllib.request.urlopen(request, timeout=600).read()
    except Exception:
        print(server.log_tail(60))
        raise
    objects = MONAILabelClient(server.url).datastore()["objects"]
    records = {s: objects.get(s, {}).get("image", {}).get("info", {}).get(INFO_KEY) or {} for s in orthanc.series}
    assert all(is_scored(r) and len(r["organs"]) >= 4 for r in records.values()), records
    return records


def _final_info(server, image_id):
    return MONAILabelClient(server.url).datastore()["objects"][image_id]["labels"]["final"]["info"]


def _revised(info):
    return sorted(n for n, r in info["organs"].items() if r["state"] == "revised")


def _drawn(handed):
    """An organ the annotator draws that Next Sample did not hand out."""
    return next(n for n in ORGANS if n not in handed)


def _fixed(served_file, handed, tmp_path, name):
    """The served pre-annotation with ``_drawn(handed)`` painted onto 500 of its background voxels (only
    that organ changes): (file on the served grid, array, the organ drawn)."""
    img = nib.load(served_file)
    served = np.asarray(img.dataobj)
    lab = served.copy()
    drawn = _drawn(handed)
    background = np.flatnonzero(served == 0)
    assert background.size >= 500, "the pre-annotation leaves no background to draw on"
    lab.flat[background[:500]] = CLASS_INDEX[drawn]
    path = str(tmp_path / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(lab, img.affine), path)
    return path, lab, drawn


def _label_info(lab):
    """MONAI Label's ``label_info`` as 3D Slicer's and OHIF's saves send it: the segments, no ``revised``."""
    return [{"name": NAMES[int(v)], "idx": int(v)} for v in np.unique(lab) if v]


def test_a_save_naming_no_organs_counts_the_organs_handed_out_and_changed_and_one_naming_some_records_them(
    server, orthanc, scored, tmp_path
):
    ann = MONAILabelClient(server.url, client_id="annotator-1", tmpdir=str(tmp_path))
    got = ann.next_sample("importance", {})
    image, handed = got["id"], got["organs"]
    assert image in orthanc.series and handed == scored[image]["organs"][:2], got
    served_file, _ = ann.infer("segresnet", image, {})  # kept as the image's pre-annotation
    path, lab, drawn = _fixed(served_file, handed, tmp_path, "fixed")
    segs = len(orthanc.find_series(Modality="SEG"))
    ann.save_label(image, path, tag="final", params={"label_info": _label_info(lab)})
    assert len(orthanc.find_series(Modality="SEG")) == segs + 1, "the label did not reach the PACS"
    info = _final_info(server, image)
    assert _revised(info) == sorted(handed + [drawn]), info["organs"]
    assert info["revised_from"] == {"handed_out": handed, "changed": [drawn]}
    assert {info["organs"][n]["client_id"] for n in handed} == {"annotator-1"}

    # Another annotator, handed nothing of it: a whole-volume revision, as before (no organ records).
    MONAILabelClient(server.url, client_id="annotator-9").save_label(image, path, tag="final", params={})
    info = _final_info(server, image)
    assert "organs" not in info and "revised_from" not in info, info

    # The annotator who holds the hand-out names the revised organs: recorded as sent, overriding the
    # organs handed out and changed; a name outside the label set is refused, naming it.
    named = [n for n in ORGANS if n not in handed and n != drawn][:1]
    ann.save_label(image, path, tag="final", params={"label_info": _label_info(lab), "revised": named})
    info = _final_info(server, image)
    assert _revised(info) == named and "revised_from" not in info, info["organs"]
    with pytest.raises(MONAILabelClientException) as refused:
        ann.save_label(image, path, tag="final", params={"revised": named + ["brain"]})
    assert "Status: 422" in refused.value.msg and "label set: brain" in refused.value.msg, refused.value.msg


def _stow_as_ohif(server, orthanc, image, path, lab, monkeypatch):
    """The label as a DICOM SEG of the image's series, stored by STOW through the server's /proxy/dicom
    (OHIF's wadoRoot; its export posts there), not through MONAI Label's Submit Label."""
    import pydicom
    from dicomweb_client import DICOMwebClient
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg

    _, files = orthanc.series[image]
    # dcmqi's itkimage2segimage, as the server finds it: in the venv's bin/.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    seg_file = nifti_to_dicom_seg(os.path.dirname(files[0]), path, _label_info(lab))
    try:
        # One POST with its length, as a browser sends it (the proxy forwards no chunked transfer).
        stow = DICOMwebClient(url=f"{server.url}/proxy/dicom/wado", chunk_size=1 << 30)
        stow.store_instances([pydicom.dcmread(seg_file)])
    finally:
        os.unlink(seg_file)


def test_a_seg_stored_in_the_pacs_after_an_anonymous_next_sample_is_read_with_those_organs(
    server, orthanc, scored, tmp_path, monkeypatch
):
    ohif = MONAILabelClient(server.url, tmpdir=str(tmp_path))  # no client id, as OHIF's panel
    got = ohif.next_sample("importance", {})
    image, handed = got["id"], got["organs"]
    assert handed == scored[image]["organs"][:2], got
    served_file, _ = ohif.infer("segresnet", image, {})
    path, lab, drawn = _fixed(served_file, handed, tmp_path, "exported")
    _stow_as_ohif(server, orthanc, image, path, lab, monkeypatch)
    # The server is not told; the next Next Sample reads the SEG while the hand-out is open.
    ohif.next_sample("importance", {})
    info = _final_info(server, image)
    assert _revised(info) == sorted(handed + [drawn]), info["organs"]
    assert info["revised_from"] == {"handed_out": handed, "changed": [drawn]}
    with urllib.request.urlopen(f"{server.url}/datastore/?output=stats", timeout=60) as r:
        assert json.load(r)["completed"] >= 1
    # What the trainer masks its loss with: exactly those organs of this image.
    assert _trainer_view(server)[image] == sorted(handed + [drawn])
    _assert_a_segs_metadata_is_asked_once(orthanc, image, tmp_path)


def _assert_a_segs_metadata_is_asked_once(orthanc, image, tmp_path):
    """Next Sample looks for SEGs of every held image at every call: the PACS is asked for a SEG's metadata
    (which series it references) once, not at each look (a datastore of this app on the same PACS)."""
    from dicomweb_client import DICOMwebClient

    from lib.datastore.dicomweb import CheckedDICOMWebDatastore

    client = DICOMwebClient(url=orthanc.dicomweb)
    asked = []
    retrieve = client.retrieve_series_metadata
    client.retrieve_series_metadata = lambda *a, **k: asked.append(a) or retrieve(*a, **k)
    datastore = CheckedDICOMWebDatastore(client, {"Modality": "CT"}, cache_path=str(tmp_path / "cache"))
    segs = [s["MainDicomTags"]["SeriesInstanceUID"] for s in orthanc.find_series(Modality="SEG")]
    before = len(asked)
    found = datastore._segs_of(image)  # a fresh cache knows no study: every SEG of the PACS is looked at
    assert len(found) == 1 and found[0] in segs
    assert len(asked) - before == len(segs) >= 1
    assert datastore._segs_of(image) == found and datastore._segs_of(image) == found
    assert len(asked) - before == len(segs), asked


def _trainer_view(server):
    """What the trainer masks its loss with, by series UID (``dicomweb_support.trainer_view``)."""
    return trainer_view(server.cache, ORGANS)
