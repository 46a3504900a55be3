"""Importance scoring and "Next Sample" through a real server, driven by MONAI Label's client."""

from __future__ import annotations

import json
import os
import threading
import urllib.request

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient

from testing.phantoms import make_phantom, write_phantom
from lib.weights import RELEASED_FILES
from support import Server, copy_into, shared_path, write_synthetic_checkpoint

pytestmark = pytest.mark.server

PHANTOMS = ["ph_a", "ph_b", "ph_c"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    ct = shared_path("data", "totalseg-example", "ct.nii.gz")
    work = tmp_path_factory.mktemp("importance")
    studies = work / "studies"
    for i, name in enumerate(PHANTOMS):
        # Small field of view: one sliding window per volume on the CPU.
        write_phantom(make_phantom(40 + i, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(studies), name, None)
    copy_into(ct, str(studies), "totalseg_ct.nii.gz")
    (studies / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    weights = work / "weights"
    write_synthetic_checkpoint("segresnet", str(weights / RELEASED_FILES["segresnet"]), seed=0)
    srv = Server(
        str(studies),
        {
            "models": "segresnet",
            "importance_mode": "reference",  # the AbdomenAtlas-8K score this test was written for
            "weights_dir": str(weights),
            "model_dir": str(work / "model"),
            "use_pretrained_model": "false",
            "overlap": "0",
        },
        str(work),
        # No train tasks on this server (MONAI Label's switch): the app must not add its own back.
        env={"MONAI_LABEL_TASKS_TRAIN": "false"},
    )
    try:
        srv.wait_ready()
        yield {"server": srv, "work": work, "studies": studies}
    finally:
        srv.stop()


def _post(url, body=None):
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def _records(client):
    ds = client.datastore()
    return {k: v["image"]["info"].get("importance") for k, v in ds["objects"].items()}


def test_scoring_stores_score_organs_and_model_versions_and_survives_a_broken_study(env):
    srv = env["server"]
    run = _post(srv.url + "/scoring/importance?run_sync=true")
    assert run["scored"] == 4 and run["failed"] == 1, run
    recs = _records(MONAILabelClient(srv.url))
    assert "error" in recs["broken"] and "broken.nii.gz" in recs["broken"]["error"]
    for name in PHANTOMS + ["totalseg_ct"]:
        rec = recs[name]
        assert isinstance(rec["score"], int) and rec["score"] >= 0
        assert set(rec["models"]) == {"segresnet"} and len(rec["models"]["segresnet"]) == 12
        assert set(rec["organs"]) <= set(rec["priority"]) and len(rec["priority"]) == 25
        assert all(v > 0 for v in rec["attention_ml"].values())
        # Where the time went (stored with the record; the server's scoring loads each volume ahead).
        assert list(rec["stages"]) == ["pre", "segresnet", "masks", "attention"], rec["stages"]
        assert all(v >= 0 for v in rec["stages"].values())
        assert sum(rec["stages"].values()) == pytest.approx(rec["seconds"], rel=0.1, abs=0.05)
    again = _post(srv.url + "/scoring/importance?run_sync=true")
    # Current scores (and the error of an unchanged broken file) are not recomputed.
    assert again["scored"] == 0 and again["failed"] == 0 and again["skipped"] == 5, again


def test_next_sample_gives_the_top_scored_image_then_another_after_its_label_is_saved(env, tmp_path):
    srv = env["server"]
    client = MONAILabelClient(srv.url, tmpdir=str(tmp_path))
    recs = {k: v for k, v in _records(client).items() if v and "score" in v}
    by_rank = sorted(recs, key=lambda k: (-recs[k]["score"], k))  # descending score, then id
    best, second = by_rank[0], by_rank[1]
    top = client.next_sample("importance", {"client_id": "annotator-1"})
    assert top["id"] == best and top["score"] == recs[best]["score"]
    assert top["organs"] == recs[best]["organs"]
    # The annotator revises and saves a final label for it.
    img = nib.load(str(env["studies"] / f"{best}.nii.gz"))
    label = tmp_path / "revised.nii.gz"
    revised = np.zeros(img.shape, np.uint8)
    revised[10:30, 10:30, 8:20] = 6  # the annotator's liver
    nib.save(nib.Nifti1Image(revised, img.affine), str(label))
    client.save_label(best, str(label), tag="final")
    nxt = client.next_sample("importance", {"client_id": "annotator-1"})
    assert nxt["id"] == second and nxt["score"] == recs[second]["score"], (nxt, by_rank)


def test_train_tasks_turned_off_in_monai_label_stay_off(env):
    info = MONAILabelClient(env["server"].url).info()
    assert info["trainers"] == {}, sorted(info["trainers"])


def test_two_annotators_asking_at_once_get_different_images(env):
    srv = env["server"]
    got = []

    def ask(cid):
        got.append(MONAILabelClient(srv.url).next_sample("importance", {"client_id": cid}).get("id"))

    threads = [threading.Thread(target=ask, args=(f"c{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and got[0] != got[1], got


def test_attention_infer_returns_the_map_on_the_input_grid(env, tmp_path):
    client = MONAILabelClient(env["server"].url, tmpdir=str(tmp_path))
    label_file, params = client.infer("attention", "ph_a", {})
    lab = nib.load(label_file)
    img = nib.load(str(env["studies"] / "ph_a.nii.gz"))
    assert lab.shape == img.shape
    np.testing.assert_allclose(lab.affine, img.affine, atol=1e-4)
    assert set(np.unique(np.asarray(lab.dataobj)).tolist()) <= {0, 1, 2, 3}
    assert params["label_names"] == {"uncertain": 1, "inconsistent": 2, "overlap": 3}
    assert isinstance(params["score"], int) and params["organs"] == _records(client)["ph_a"]["organs"]
    stages = params["stages"]
    assert list(stages) == ["pre", "segresnet", "masks", "attention", "resample", "write"], stages
    assert all(v >= 0 for v in stages.values())
    assert sum(stages.values()) == pytest.approx(params["latencies"]["total"], rel=0.15, abs=0.1)


def test_a_new_model_makes_old_scores_stale_and_they_are_recomputed(env):
    srv = env["server"]
    old = _records(MONAILabelClient(srv.url))["ph_a"]["models"]["segresnet"]
    published = env["work"] / "model" / "segresnet_finetuned.pth"
    write_synthetic_checkpoint("segresnet", str(published) + ".new", seed=7)
    os.replace(str(published) + ".new", str(published))  # published atomically, as the trainer does
    run = _post(srv.url + "/scoring/importance?run_sync=true")
    assert run["skipped"] == 0 and run["scored"] >= 2, run
    new = _records(MONAILabelClient(srv.url))["ph_b"]["models"]["segresnet"]
    assert new != old
    info = MONAILabelClient(srv.url).info()
    assert info["models"]["segresnet"]["weights"]["segresnet"]["source"] == "fine-tuned"
