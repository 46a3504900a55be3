"""Faults under load through a real server: 16 annotators submit labels at once while a round trains."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request

import nibabel as nib
import numpy as np
import pytest
from filelock import FileLock
from monailabel.client import MONAILabelClient

from testing.phantoms import make_phantom, write_phantom
from lib.weights import RELEASED_FILES
from support import REPO, Server, write_synthetic_checkpoint

pytestmark = pytest.mark.server

N_CLIENTS = 16
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
    "val_fraction": "0.2",
    # The 16 saves during round 1 ask for the next round: it runs right after, in the same process.
    "round_every_labels": str(N_CLIENTS),
}


def _rounds(client):
    return client.info()["suprem"]["rounds"]


def _wait(what, predicate, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}")


def test_labels_saved_by_16_clients_during_a_round_are_all_kept_and_all_in_the_next_round(tmp_path):
    studies, truth = tmp_path / "studies", {}
    for i in range(N_CLIENTS + 2):
        ph = make_phantom(300 + i, shape=(32, 32, 24), spacing_mm=(3.0, 3.0, 4.0))
        name = f"ph_{i:02d}"
        write_phantom(ph, str(studies), name, None)
        truth[name] = tmp_path / "sent" / f"{name}.nii.gz"
        truth[name].parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(ph.label, ph.affine), str(truth[name]))
    write_synthetic_checkpoint("segresnet", str(tmp_path / "weights" / RELEASED_FILES["segresnet"]))
    conf = dict(CONF, weights_dir=str(tmp_path / "weights"), model_dir=str(tmp_path / "model"))
    first, during = sorted(truth)[:2], sorted(truth)[2:]

    # MONAI Label's datastore auto reload on, as its default settings run: the server's file watcher
    # reloads the record whenever a process writes it, while the 16 saves land.
    srv = Server(str(studies), conf, str(tmp_path), env={"MONAI_LABEL_DATASTORE_AUTO_RELOAD": "true"}).wait_ready()
    # The pool's scoring lock, held as another scoring of the pool would hold it (waiting first for the
    # start-up scoring if it has it): round 1 trains while the saves land, and its re-scoring, the round's
    # last step, waits for the lock, so the round is still running when every save has been answered.
    other_scoring = FileLock(str(studies / ".suprem" / "scoring.lock"))
    try:
        client = MONAILabelClient(srv.url, tmpdir=str(tmp_path))
        for name in first:
            client.save_label(name, str(truth[name]), tag="final")
        other_scoring.acquire(timeout=300)
        # Round 1 on demand, with the command the README gives.
        cli = subprocess.run(
            [sys.executable, "-m", "lib.rounds", "start", "--server", srv.url],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )
        assert cli.returncode == 0, cli.stderr
        _wait("round 1 to train", lambda: (tmp_path / "model" / "train_segresnet" / "round_001").exists(), 300)
        current = _rounds(client)["current"]
        assert current and current["round"] == 1 and current["labels_used"] == 2, current

        barrier, errors, lock = threading.Barrier(N_CLIENTS), [], threading.Lock()

        def annotator(name):
            mine = MONAILabelClient(srv.url, tmpdir=str(tmp_path / "clients" / name))
            barrier.wait()
            try:
                mine.save_label(name, str(truth[name]), tag="final")
                # Read your writes: the very next listing holds the label the server answered 200 for.
                if "final" not in mine.datastore()["objects"][name]["labels"]:
                    raise AssertionError("saved (200) but not in the next listing")
            except Exception as e:  # collected: every save must succeed
                with lock:
                    errors.append((name, repr(e)))

        for name in during:
            (tmp_path / "clients" / name).mkdir(parents=True)
        threads = [threading.Thread(target=annotator, args=(n,)) for n in during]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
        # Every image has a final label now: Next Sample hands none of them out again.
        assert client.next_sample("importance", {}) == {}
        still = _rounds(client)["current"]
        assert still and still["round"] == 1, f"round 1 ended before the saves were in: {still}"
        other_scoring.release()  # round 1 re-scores and ends; the 16 saves asked for round 2

        # Every label is on disk, byte for byte what was sent, and on its image's grid.
        for name in first + during:
            saved = studies / "labels" / "final" / f"{name}.nii.gz"
            assert saved.read_bytes() == truth[name].read_bytes(), name
            img = nib.load(str(studies / f"{name}.nii.gz"))
            assert nib.load(str(saved)).shape == img.shape

        last = _wait(
            "round 2",
            lambda: (lambda r: r if r.get("round", 0) >= 2 and r.get("status") in ("done", "failed") else None)(
                _rounds(client).get("last") or {}
            ),
            900,
        )
        log = json.load(open(studies / ".suprem" / "rounds" / "rounds.json"))
        by_round = {e["round"]: e for e in log}
        assert by_round[1]["status"] == "done", by_round[1]
        assert by_round[1]["label_ids"] == first
        r2 = by_round[2]
        assert r2["status"] == "done" and r2["trigger"] == "labels", r2
        missing = sorted(set(first + during) - set(r2["label_ids"]))
        assert not missing, f"labels saved during round 1 that round 2 did not train on: {missing}"
        assert r2["labels_used"] == N_CLIENTS + 2 and last["round"] == 2

        # The datastore record of every label survives the round (its process writes the same file).
        record = json.load(open(studies / "datastore_v2.json"))["objects"]
        for name in first + during:
            final = record[name]["labels"].get("final")
            assert final and final["info"].get("checked", {}).get("voxels", 0) > 0, (name, record[name]["labels"])
        listed = client.datastore()["objects"]
        assert all("final" in listed[n]["labels"] for n in first + during)
    finally:
        other_scoring.release(force=True)
        srv.stop()


def test_16_annotators_asking_for_the_next_sample_at_once_queue_one_scoring_run_not_16(tmp_path):
    """MONAI Label queues a scoring run after every Next Sample (its default auto scoring); 16 waiting
    runs of a process that loads the app and walks the datastore would hold a CPU for minutes."""
    studies = tmp_path / "studies"
    for i in range(4):
        write_phantom(make_phantom(400 + i, shape=(32, 32, 24), spacing_mm=(3.0, 3.0, 4.0)), str(studies), f"ph_{i}", None)
    write_synthetic_checkpoint("segresnet", str(tmp_path / "weights" / RELEASED_FILES["segresnet"]))
    conf = dict(CONF, weights_dir=str(tmp_path / "weights"), model_dir=str(tmp_path / "model"))
    srv = Server(str(studies), conf, str(tmp_path), env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "true"}).wait_ready()

    def scoring_tasks():
        with urllib.request.urlopen(srv.url + "/scoring/?all=true", timeout=30) as r:
            got = json.load(r)
        return got if isinstance(got, list) else [got]

    try:
        barrier, answers = threading.Barrier(N_CLIENTS), []

        def annotator(c):
            client = MONAILabelClient(srv.url, tmpdir=str(tmp_path))
            barrier.wait()
            try:  # "first": 16 answers from 4 images (random's weights are all 0 within one second)
                answers.append(client.next_sample("first", {"client_id": f"annotator-{c}"}).get("id"))
            except Exception as e:
                answers.append(repr(e))

        threads = [threading.Thread(target=annotator, args=(c,)) for c in range(N_CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert len(answers) == N_CLIENTS and all(a in {f"ph_{i}" for i in range(4)} for a in answers), answers
        # The start-up run, plus at most one running and one waiting for the 16 requests.
        runs = scoring_tasks()
        assert 2 <= len(runs) <= 3, [t.get("status") for t in runs]
        done = _wait(
            "the scoring runs to end",
            lambda: (lambda ts: ts if all(t.get("status") not in ("SUBMITTED", "RUNNING") for t in ts) else None)(
                scoring_tasks()
            ),
            600,
        )
        assert len(done) <= 3 and all(t["status"] == "DONE" for t in done), [t.get("status") for t in done]
    finally:
        srv.stop()
