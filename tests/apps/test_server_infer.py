"""A real `monailabel start_server` process serving the SuPreM app, driven by MONAI Label's own client."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from lib.classes import CLASS_INDEX, LABEL_SETS
from support import Server, TOTALSEG, copy_into, shared_path, write_synthetic_checkpoint
from lib.weights import RELEASED_FILES

pytestmark = pytest.mark.server


def _write_nrrd_copy(src: str, dst: str) -> str:
    import itk

    itk.imwrite(itk.imread(src), dst)
    return dst


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ct = shared_path("data", "totalseg-example", "ct.nii.gz")
    work = tmp_path_factory.mktemp("server")
    studies = work / "studies"
    copy_into(ct, str(studies), "totalseg_ct.nii.gz")
    _write_nrrd_copy(ct, str(studies / "totalseg_nrrd.nrrd"))
    (studies / "corrupt.nii.gz").write_bytes(b"\x1f\x8b this is not a gzip stream nor a NIfTI" * 10)
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), str(studies / "flat2d.nii.gz"))
    weights = work / "weights"
    for backbone, name in RELEASED_FILES.items():
        write_synthetic_checkpoint(backbone, str(weights / name), seed=0)
    srv = Server(
        str(studies),
        {
            "models": "all",
            "importance_mode": "reference",  # the AbdomenAtlas-8K score this test was written for
            "weights_dir": str(weights),
            "model_dir": str(work / "model"),
            "use_pretrained_model": "false",
            "overlap": "0.25",
        },
        str(work),
    )
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("client")))


def _check_label_matches(label_file: str, image_file: str, allowed):
    lab = nib.load(label_file)
    img = nib.load(image_file)
    assert lab.shape == img.shape
    np.testing.assert_allclose(lab.affine, img.affine, atol=1e-4)
    values = set(np.unique(np.asarray(lab.dataobj)).tolist())
    assert values <= {0} | set(allowed), values - set(allowed)
    return values


def test_info_lists_each_backbone_and_the_ensemble_with_named_labels(client):
    info = client.info()
    assert set(info["models"]) == {"unet", "swinunetr", "segresnet", "ensemble", "attention"}
    expected = {n: CLASS_INDEX[n] for n in LABEL_SETS["atlas25"]}
    for name, model in info["models"].items():
        if name != "attention":
            assert model["labels"] == expected, name
        assert model["type"] == "segmentation"
    for backbone in ("unet", "swinunetr", "segresnet"):
        w = info["models"][backbone]["weights"][backbone]
        assert w["source"] == "released" and w["file"].endswith(RELEASED_FILES[backbone])
        assert len(w["version"]) == 12
    # The app's labels: names in class-index order (MONAI Label's own form; OHIF's panel needs a list).
    assert info["labels"] == sorted(expected, key=expected.get) and isinstance(info["labels"], list)
    assert set(info["trainers"]) == {"unet", "swinunetr", "segresnet", "round"}
    assert set(info["strategies"]) >= {"importance", "random"} and "importance" in info["scoring"]


def test_infer_nifti_returns_label_on_input_grid_with_allowed_values(client, server):
    label_file, params = client.infer("segresnet", "totalseg_ct", {})
    values = _check_label_matches(label_file, os.path.join(TOTALSEG, "ct.nii.gz"), range(1, 26))
    assert len(values) > 1, "synthetic weights still label something"
    assert params["label_names"]["liver"] == 6
    stages = params["stages"]  # where the time went
    assert list(stages) == ["pre", "segresnet", "label_map", "resample", "write"], stages
    assert all(v >= 0 for v in stages.values())
    assert sum(stages.values()) == pytest.approx(params["latencies"]["total"], rel=0.15, abs=0.1)


def test_infer_nrrd_input_returns_label_on_the_nrrd_grid(client, tmp_path):
    import itk

    label_file, _ = client.infer("segresnet", "totalseg_nrrd", {})
    lab = nib.load(label_file)
    ref = itk.imread(os.path.join(TOTALSEG, "ct.nii.gz"))
    assert lab.shape == tuple(reversed(ref.shape))  # itk shapes are z, y, x
    np.testing.assert_allclose(lab.affine, nib.load(os.path.join(TOTALSEG, "ct.nii.gz")).affine, atol=1e-4)


@pytest.mark.parametrize(
    "image_id, status, words",
    [
        ("corrupt", 422, "could not read"),
        ("flat2d", 422, "3-D"),
        ("no_such_image", 404, "not in the datastore"),
        ("../../etc/passwd", 400, "path characters"),
    ],
)
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(client, image_id, status, words):
    with pytest.raises(MONAILabelClientException) as err:
        client.infer("segresnet", image_id, {"overlap": 0.0})
    assert f"Status: {status};" in err.value.msg, err.value.msg
    assert words in str(err.value.msg)
    info = client.info()  # still alive and answering
    assert "segresnet" in info["models"]


def test_next_request_after_a_failure_still_segments(client):
    with pytest.raises(MONAILabelClientException):
        client.infer("segresnet", "corrupt", {})
    label_file, _ = client.infer("segresnet", "totalseg_ct", {"overlap": 0.0})
    _check_label_matches(label_file, os.path.join(TOTALSEG, "ct.nii.gz"), range(1, 26))


def _datastore_labels(client):
    return {k: v.get("labels", {}) for k, v in client.datastore()["objects"].items()}


@pytest.mark.parametrize(
    "case, words",
    [
        ("wrong_shape", "does not match the image shape"),
        ("foreign_values", "not classes of this app's label set"),
        ("empty", "label is empty"),
        ("other_grid", "affine"),
        ("not_an_image", "could not read the label"),
    ],
)
def test_bad_labels_are_refused_and_the_datastore_is_unchanged(client, tmp_path, case, words):
    ref = nib.load(os.path.join(TOTALSEG, "ct.nii.gz"))
    arr = np.zeros(ref.shape, np.uint8)
    arr[40:60, 40:60, 10:20] = 6
    path = tmp_path / f"{case}.nii.gz"
    if case == "wrong_shape":
        nib.save(nib.Nifti1Image(arr[:-1], ref.affine), str(path))
    elif case == "foreign_values":
        arr[0:5, 0:5, 0:5] = 77
        nib.save(nib.Nifti1Image(arr, ref.affine), str(path))
    elif case == "empty":
        nib.save(nib.Nifti1Image(np.zeros(ref.shape, np.uint8), ref.affine), str(path))
    elif case == "other_grid":
        nib.save(nib.Nifti1Image(arr, np.diag([1.0, 1.0, 1.0, 1.0])), str(path))
    else:
        path.write_bytes(b"nope")
    before = _datastore_labels(client)
    with pytest.raises(MONAILabelClientException) as err:
        client.save_label("totalseg_ct", str(path), tag="final")
    assert "Status: 422;" in err.value.msg and words in err.value.msg, err.value.msg
    assert _datastore_labels(client) == before


def test_a_good_label_is_saved_as_final(client, tmp_path):
    ref = nib.load(os.path.join(TOTALSEG, "ct.nii.gz"))
    seg = nib.load(os.path.join(TOTALSEG, "seg.nii.gz"))
    from lib.classes import TOTALSEG_TO_SUPREM, mapping_lut

    lut = np.array(mapping_lut(TOTALSEG_TO_SUPREM), np.uint8)
    arr = lut[np.asarray(seg.dataobj).astype(np.int64)]
    path = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(arr, ref.affine), str(path))
    client.save_label("totalseg_ct", str(path), tag="final")
    assert "final" in _datastore_labels(client)["totalseg_ct"]
