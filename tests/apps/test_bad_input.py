"""Bad input and bad weights through one real server: each row of the table is a case and what the user gets.

Every refused request must (1) answer 4xx with a message naming the problem, (2) leave the server
serving, (3) leave the datastore (studies folder, labels, datastore JSON) and the folders around it
byte for byte as they were. Bad studies sit in the studies folder before the start, as a user's
folder of scans would hold them; bad weights sit where the server looks for released weights and
published models.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from testing.phantoms import make_phantom, write_phantom
from testing.synthetic_weights import synthetic_released_state_dict
from lib.weights import RELEASED_FILES
from support import Server, write_synthetic_checkpoint

pytestmark = pytest.mark.server

SHAPE, SPACING = (32, 32, 24), (3.0, 3.0, 4.0)  # one 96^3 window at the recipe's 1.5 mm


class _RunsCode:
    """Pickles as ``os.system("touch <marker>")``: what a booby-trapped checkpoint carries."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_payload(path: str, marker: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"net": {"module.conv.weight": _RunsCode(marker)}, "epoch": 2100}, path)
    return path


def _write_nrrd(image: np.ndarray, spacing, path: str) -> str:
    import itk

    img = itk.image_from_array(np.ascontiguousarray(image.T))  # itk arrays are z, y, x
    img.SetSpacing([float(s) for s in spacing])
    itk.imwrite(img, path, compression=True)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("badinput")
    studies, weights, model = work / "studies", work / "weights", work / "model"
    good = make_phantom(71, shape=SHAPE, spacing_mm=SPACING)
    write_phantom(good, str(studies), "ph_good", None)
    write_phantom(make_phantom(72, shape=SHAPE, spacing_mm=SPACING), str(studies), "ph_label", None)
    # A scan copied half-way (a truncated .nii.gz), and an NRRD whose compressed data stops short.
    full = (studies / "ph_good.nii.gz").read_bytes()
    (studies / "corrupt.nii.gz").write_bytes(full[: len(full) // 2])
    nrrd = _write_nrrd(good.image.astype(np.int16), SPACING, str(work / "whole.nrrd"))
    raw = open(nrrd, "rb").read()
    (studies / "broken_scan.nrrd").write_bytes(raw[: len(raw) - len(raw) // 3])
    os.remove(nrrd)
    nib.save(nib.Nifti1Image(good.image[:, :, 12].astype(np.int16), good.affine), str(studies / "flat2d.nii.gz"))
    frames = np.stack([good.image] * 3, axis=-1).astype(np.int16)  # a 3-frame series in one file
    nib.save(nib.Nifti1Image(frames, good.affine), str(studies / "series4d.nii.gz"))
    # MR-like: positive, arbitrary units (no air at -1000).
    mr = np.clip((good.image.astype(np.float32) + 1024.0) * 0.6, 0, None).astype(np.int16)
    nib.save(nib.Nifti1Image(mr, good.affine), str(studies / "mr_like.nii.gz"))

    markers = work / "markers"
    markers.mkdir()
    write_synthetic_checkpoint("segresnet", str(weights / RELEASED_FILES["segresnet"]))
    # Wrong keys: another architecture's weights under U-Net's released name.
    torch.save({"net": synthetic_released_state_dict("segresnet")}, str(weights / RELEASED_FILES["unet"]))
    _pickle_payload(str(weights / RELEASED_FILES["swinunetr"]), str(markers / "released_payload_ran"))
    # A booby-trapped "published" fine-tuned model beside good released SegResNet weights.
    _pickle_payload(str(model / "segresnet_finetuned.pth"), str(markers / "published_payload_ran"))

    # The payload is real: loaded the unsafe way, it runs (in a throwaway process, on another marker).
    probe_marker = work / "probe_ran"
    probe = _pickle_payload(str(work / "probe" / "probe.pth"), str(probe_marker))
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({probe!r}, weights_only=False)"],
        check=False,
        capture_output=True,
        cwd=str(work),
    )
    assert probe_marker.exists(), "the pickle payload must be able to run code, or the test proves nothing"
    probe_marker.unlink()

    conf = {
        "models": "segresnet,unet,swinunetr",
        "importance_mode": "reference",  # the AbdomenAtlas-8K score this test was written for
        "weights_dir": str(weights),
        "model_dir": str(model),
        "use_pretrained_model": "false",
        "overlap": "0",
        "skip_scoring": "true",
    }
    srv = Server(str(studies), conf, str(work))
    try:
        srv.wait_ready()
        client = MONAILabelClient(srv.url, tmpdir=str(tmp_path_factory.mktemp("badinput_client")))
        yield {"server": srv, "client": client, "work": work, "studies": studies, "markers": markers, "good": good}
    finally:
        srv.stop()


def _snapshot(work) -> dict:
    """Every file under the work folder (studies, labels, datastore JSON, weights, models, and whatever a
    path escape would write next to them) with its SHA-256; the server's own log by name only, lock
    files (empty, made on demand) left out."""
    out = {}
    for root, dirs, files in os.walk(work):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, work)
            if name.endswith(".lock") or name == ".lock":
                continue
            if name.startswith("server-") and name.endswith(".log"):
                out[rel] = "log"
                continue
            with open(path, "rb") as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def _label_file(env, tmp_path, case: str) -> str:
    img = nib.load(str(env["studies"] / "ph_label.nii.gz"))
    arr = np.zeros(img.shape, np.uint8)
    arr[8:20, 8:20, 6:14] = 6  # a liver
    path = tmp_path / f"{case}.nii.gz"
    if case == "wrong_shape":
        nib.save(nib.Nifti1Image(arr[:, :-4], img.affine), str(path))
    elif case == "foreign_values":
        arr[0:3, 0:3, 0:3] = 77
        nib.save(nib.Nifti1Image(arr, img.affine), str(path))
    elif case == "empty":
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(path))
    else:
        nib.save(nib.Nifti1Image(arr, img.affine), str(path))
    return str(path)


def _infer(model, image):
    return lambda env, tmp: env["client"].infer(model, image, {})


def _save(image, case, tag="final"):
    return lambda env, tmp: env["client"].save_label(image, _label_file(env, tmp, case), tag=tag)


def _upload(image_id):
    return lambda env, tmp: env["client"].upload_image(str(env["studies"] / "ph_good.nii.gz"), image_id=image_id)


# (case, request, status, words the answer must hold)
TABLE = [
    ("corrupt NIfTI (truncated copy)", _infer("segresnet", "corrupt"), 422, ["could not read image file corrupt.nii.gz"]),
    ("corrupt NRRD (data cut short)", _infer("segresnet", "broken_scan"), 422, ["could not read image file broken_scan.nrrd"]),
    ("2-D image", _infer("segresnet", "flat2d"), 422, ["3-D CT volume", "(32, 32)"]),
    ("4-D image", _infer("segresnet", "series4d"), 422, ["3-D CT volume", "(3, 32, 32, 24)"]),
    ("label of the wrong shape", _save("ph_label", "wrong_shape"), 422, ["(32, 28, 24)", "does not match the image shape"]),
    ("label values outside the label set", _save("ph_label", "foreign_values"), 422, ["[77]", "not classes of"]),
    ("empty label", _save("ph_label", "empty"), 422, ["label is empty"]),
    ("infer: image id with ../", _infer("segresnet", "../studies/ph_good"), 400, ["path characters"]),
    ("upload: image id with ../", _upload("../escaped"), 400, ["path characters"]),
    ("save label: image id with ../", _save("../studies/ph_label", "good"), 400, ["path characters"]),
    ("save label: tag with ../", _save("ph_label", "good", tag="../../escaped"), 400, ["label tag", "path characters"]),
    ("released U-Net file with wrong keys", _infer("unet", "ph_good"), 404, ["unet", "missing key"]),
    ("released Swin UNETR file with a pickle payload", _infer("swinunetr", "ph_good"), 404, ["refused as unsafe"]),
]


@pytest.mark.parametrize("case, request_, status, words", TABLE, ids=[row[0] for row in TABLE])
def test_bad_input_is_refused_with_a_clear_error_and_changes_nothing(env, tmp_path, case, request_, status, words):
    before = _snapshot(env["work"])
    with pytest.raises(MONAILabelClientException) as err:
        request_(env, tmp_path)
    msg = err.value.msg
    assert f"Status: {status};" in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert env["client"].info()["models"], "the server still answers /info/"
    assert _snapshot(env["work"]) == before, "a refused request changed files"
    assert not list(env["markers"].iterdir()), "a pickle payload ran"


def test_an_mr_like_image_is_segmented_and_the_answer_carries_the_warning(env):
    before = _snapshot(env["work"])
    label_file, params = env["client"].infer("segresnet", "mr_like", {})
    assert any("do not look like CT" in w for w in params.get("warnings", [])), params.keys()
    lab = nib.load(label_file)
    assert lab.shape == SHAPE
    np.testing.assert_allclose(lab.affine, env["good"].affine, atol=1e-4)
    assert _snapshot(env["work"]) == before
    # A CT gets no such warning: the check tells the two apart.
    _, ct_params = env["client"].infer("segresnet", "ph_good", {})
    assert not ct_params.get("warnings"), ct_params.get("warnings")


def test_bad_weights_are_refused_at_start_named_in_info_and_the_log_and_never_run(env):
    srv = env["server"]
    info = srv.info()
    assert set(info["models"]) == {"segresnet", "ensemble", "attention"}, "served without the refused models"
    assert info["models"]["ensemble"]["backbones"] == ["segresnet"]
    weights = info["suprem"]["weights"]
    assert RELEASED_FILES["unet"] in weights["unet"]["problem"] and "missing key" in weights["unet"]["problem"]
    assert "refused as unsafe" in weights["swinunetr"]["problem"]
    seg = weights["segresnet"]
    assert seg["source"] == "released" and seg["file"].endswith(RELEASED_FILES["segresnet"]), seg
    assert "segresnet_finetuned.pth" in seg["problem"] and "refused as unsafe" in seg["problem"], seg
    log = srv.log_tail(2000)
    for name in (RELEASED_FILES["unet"], RELEASED_FILES["swinunetr"], "segresnet_finetuned.pth"):
        lines = [ln for ln in log.splitlines() if name in ln and "ERROR" in ln]
        assert lines, f"no error line names {name}:\n{log}"
    assert not list(env["markers"].iterdir()), "a pickle payload ran"


def test_after_every_refusal_a_good_label_is_saved_and_a_good_infer_works(env, tmp_path):
    client = env["client"]
    sent = _label_file(env, tmp_path, "good")
    client.save_label("ph_label", sent, tag="final")
    saved = env["studies"] / "labels" / "final" / "ph_label.nii.gz"
    np.testing.assert_array_equal(np.asarray(nib.load(str(saved)).dataobj), np.asarray(nib.load(sent).dataobj))
    assert "final" in client.datastore()["objects"]["ph_label"]["labels"]
    label_file, params = client.infer("segresnet", "ph_good", {})
    assert nib.load(label_file).shape == SHAPE
    assert params["models"]["segresnet"]["source"] == "released", params["models"]
    assert not list(env["markers"].iterdir()), "a pickle payload ran"
