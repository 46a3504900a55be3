"""Active-learning rounds through a real server: label saves start a round that trains, publishes, re-scores."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import nibabel as nib
import numpy as np
import pytest
from filelock import FileLock
from monailabel.client import MONAILabelClient

from testing.phantoms import make_phantom, write_phantom
from lib.importance.records import INFO_KEY
from lib.weights import RELEASED_FILES
from support import Server, copy_into, shared_path, write_synthetic_checkpoint

pytestmark = pytest.mark.server

CONF = {
    "models": "segresnet",
    "importance_mode": "reference",  # the AbdomenAtlas-8K score this test was written for
    "use_pretrained_model": "false",
    # The demo's coarse grid and small window: what is checked here is the rounds' bookkeeping, not
    # the recipe's grid (tests/apps/test_server_infer.py and tests/infers run that); several windows a
    # volume, batched, so a scoring run takes seconds, not minutes (the real CT included).
    "preset": "demo",
    "overlap": "0",
    "train_epochs": "1",
    "val_fraction": "0.5",
}


def _setup(work, n=4):
    studies = work / "studies"
    truth = {}
    for i in range(n):
        ph = make_phantom(60 + i, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0))
        write_phantom(ph, str(studies), f"ph_{i}", None)
        lab = work / "truth" / f"ph_{i}.nii.gz"
        lab.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(ph.label, ph.affine), str(lab))
        truth[f"ph_{i}"] = str(lab)
    copy_into(shared_path("data", "totalseg-example", "ct.nii.gz"), str(studies), "totalseg_ct.nii.gz")
    write_synthetic_checkpoint("segresnet", str(work / "weights" / RELEASED_FILES["segresnet"]))
    conf = dict(CONF, weights_dir=str(work / "weights"), model_dir=str(work / "model"))
    return studies, truth, conf


def _rounds(client):
    return client.info()["suprem"]["rounds"]


def _wait_round(client, number, timeout=900, status=("done", "failed")):
    deadline = time.time() + timeout
    while time.time() < deadline:
        last = _rounds(client).get("last") or {}
        if last.get("round", 0) >= number and last.get("status") in status:
            return last
        time.sleep(3)
    raise AssertionError(f"round {number} did not finish: {_rounds(client)}")


def test_saved_labels_start_a_round_that_publishes_rescores_and_serves_the_new_model(tmp_path):
    studies, truth, conf = _setup(tmp_path)
    srv = Server(str(studies), dict(conf, round_every_labels="2"), str(tmp_path)).wait_ready()
    try:
        client = MONAILabelClient(srv.url, tmpdir=str(tmp_path))
        client.save_label("ph_0", truth["ph_0"], tag="final")
        assert (_rounds(client).get("last") or {}).get("round") is None, "one label is not enough"
        # A scoring of the pool is running (as far as the server can tell: its lock is held): the round
        # trains and publishes, then its re-scoring waits for that scoring to end.
        other_scoring = FileLock(str(studies / ".suprem" / "scoring.lock"))
        other_scoring.acquire()
        try:
            client.save_label("ph_1", truth["ph_1"], tag="final")
            published = tmp_path / "model" / "segresnet_finetuned.pth.json"
            deadline = time.time() + 600
            while time.time() < deadline and not published.exists():
                time.sleep(2)
            time.sleep(8)  # a re-scoring that did not wait would have stored its first record by now
            assert _rounds(client)["current"], "the round waits to re-score"
            assert not any(INFO_KEY in _image_info(client, i) for i in ("ph_2", "ph_3", "totalseg_ct"))
        finally:
            other_scoring.release()
        last = _wait_round(client, 1)
        assert last["status"] == "done", last
        assert last["labels_used"] == 2 and last["trigger"].startswith("labels")
        pub = last["published"]["segresnet"]
        assert os.path.exists(pub["file"]) and pub["file"].endswith("segresnet_finetuned.pth")
        assert last["rescored"] == 3  # ph_2, ph_3 and the real CT
        assert last["top"] and last["top"][0]["id"] in {"ph_2", "ph_3", "totalseg_ct"}
        info = client.info()
        assert info["models"]["segresnet"]["weights"]["segresnet"]["version"] == pub["version"]
        # Next Sample follows the round's new ranking, and infer on it runs the new model.
        nxt = client.next_sample("importance", {"client_id": "annotator-1"})
        assert nxt["id"] == last["top"][0]["id"] and nxt["score"] == last["top"][0]["score"], (nxt, last["top"])
        _, params = client.infer("segresnet", nxt["id"], {})
        assert params["models"]["segresnet"]["version"] == pub["version"]
        split = json.load(open(studies / ".suprem" / "split.json"))["sides"]
        assert set(split) == {"ph_0.nii.gz", "ph_1.nii.gz"}
        # On demand, through MONAI Label's own train endpoint: round 2, and ph_0/ph_1 keep their sides.
        client.save_label("ph_2", truth["ph_2"], tag="final")
        client.train_start("round", {})
        last = _wait_round(client, 2)
        assert last["status"] == "done" and last["labels_used"] == 3, last
        split2 = json.load(open(studies / ".suprem" / "split.json"))["sides"]
        assert {k: split2[k] for k in split} == split and "ph_2.nii.gz" in split2
    finally:
        srv.stop()


def test_a_server_killed_mid_round_keeps_the_old_model_and_the_next_round_runs(tmp_path):
    studies, truth, conf = _setup(tmp_path)
    conf = dict(conf, train_epochs="200")  # long enough to be killed in the middle
    srv = Server(str(studies), conf, str(tmp_path)).wait_ready()
    published = tmp_path / "model" / "segresnet_finetuned.pth"
    write_synthetic_checkpoint("segresnet", str(published), seed=3)
    before = published.read_bytes()
    try:
        client = MONAILabelClient(srv.url, tmpdir=str(tmp_path))
        for i in range(2):
            client.save_label(f"ph_{i}", truth[f"ph_{i}"], tag="final")
        client.train_start("round", {})
        deadline = time.time() + 300
        while time.time() < deadline and not (tmp_path / "model" / "train_segresnet" / "round_001").exists():
            time.sleep(2)
        time.sleep(5)
        assert _rounds(client)["current"], "the round is running"
    finally:
        srv.kill()
        srv.stop()
    assert published.read_bytes() == before, "the published model is untouched"
    _training_off_runs_no_round(studies, truth, conf, tmp_path)
    # Training on again, scoring switched off (MONAI Label's switch, its auto scoring on).
    scoring_off = {"MONAI_LABEL_TASKS_SCORING": "false", "MONAI_LABEL_AUTO_UPDATE_SCORING": "true"}
    srv2 = Server(str(studies), dict(conf, train_epochs="1"), str(tmp_path), env=scoring_off).wait_ready()
    try:
        client = MONAILabelClient(srv2.url, tmpdir=str(tmp_path))
        assert set(client.datastore()["objects"]) >= {"ph_0", "ph_1", "ph_2"}  # no label is lost across the crash
        # The start ran the interrupted round again (its labels were still new).
        last = _wait_round(client, 2)
        assert last["status"] == "done" and last["trigger"] == "resumed round 1", last
        assert last["labels_used"] == 3
        assert published.read_bytes() != before
        # Scoring switched off: the round re-scored nothing, and no scoring process ran.
        assert last["rescored"] == 0, last
        assert not any(INFO_KEY in _image_info(client, i) for i in ("ph_3", "totalseg_ct"))
        with pytest.raises(urllib.error.HTTPError) as no_task:
            urllib.request.urlopen(srv2.url + "/scoring/?all=true", timeout=30)
        assert no_task.value.code == 404  # MONAI Label: "No Scoring Tasks Found"
    finally:
        srv2.stop()


def _image_info(client, image_id):
    return client.datastore()["objects"][image_id]["image"].get("info", {})


def _training_off_runs_no_round(studies, truth, conf, work):
    """MONAI Label's train tasks switched off: the interrupted round is not run again at start, and a saved
    final label with round_every_labels 1 starts none; the label is counted, the log kept."""
    conf = dict(conf, train_epochs="1", round_every_labels="1")
    srv = Server(str(studies), conf, str(work), env={"MONAI_LABEL_TASKS_TRAIN": "false"}).wait_ready()
    try:
        client = MONAILabelClient(srv.url, tmpdir=str(work))
        assert client.info()["trainers"] == {}
        client.save_label("ph_2", truth["ph_2"], tag="final")
        assert _rounds(client)["labels_since_round"] >= 1  # the save reached the round manager
        time.sleep(8)  # a round started by the start or the save would be logged within a second or two
        rounds = _rounds(client)
        assert rounds["current"] is None and rounds["rounds"] == 1 and rounds["last"]["round"] == 1, rounds
        assert not (work / "model" / "train_segresnet" / "round_002").exists()
        assert rounds["off"] and rounds["last"]["status"] == "interrupted"
    finally:
        srv.stop()
