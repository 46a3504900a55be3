"""Stopping a real server (SIGINT, SIGTERM to its process) ends its scoring and training subprocesses,
loses nothing, and the next start carries on: missing scores are computed, an interrupted round runs again."""

from __future__ import annotations

import json
import os
import signal
import time

import nibabel as nib
import psutil
import pytest
from monailabel.client import MONAILabelClient

from testing.phantoms import make_phantom, write_phantom
from lib.weights import RELEASED_FILES
from support import Server, write_synthetic_checkpoint

pytestmark = pytest.mark.server

N = 3
CONF = {
    "models": "segresnet",
    "importance_mode": "reference",  # the AbdomenAtlas-8K score this test was written for
    "use_pretrained_model": "false",
    "overlap": "0",
    "train_roi": "32",
    "train_epochs": "1",
    "train_num_samples": "1",
    "val_fraction": "0.5",
}
SLOW = {"overlap": "0.5"}  # several sliding windows per volume: a scoring run lasts long enough to be cut
LONG_TRAINING = {"train_epochs": "300"}


def _wait(what, predicate, timeout, step=0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def _session(srv):
    """Processes of the server's session (it was started with one of its own), zombies left out."""
    alive = []
    for p in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if os.getsid(p.pid) == srv.proc.pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


def _signal_and_wait_for_an_empty_session(srv, sig):
    assert srv.proc.poll() is None, srv.log_tail()
    os.kill(srv.proc.pid, sig)  # the server's process only, as `kill <pid>` does: it must end its children
    sent = time.time()
    while time.time() - sent < 10:
        srv.proc.poll()  # reap the server (a zombie is not alive, but leaves the list cleaner)
        if not _session(srv):
            break
        time.sleep(0.2)
    left = _session(srv)
    tail = srv.log_tail(60)
    srv.stop()
    assert not left, f"alive 10 s after {sig.name}: {left}\n{tail}"


def _records(studies):
    """{image id: importance record} from the datastore file as it is on disk now."""
    try:
        with open(studies / "datastore_v2.json") as f:
            objects = json.load(f)["objects"]
    except (OSError, ValueError, KeyError):  # being written in place: look again
        return {}
    return {k: v["image"]["info"]["importance"] for k, v in objects.items() if "importance" in v["image"]["info"]}


def _round_log(studies):
    return {e["round"]: e for e in json.load(open(studies / ".suprem" / "rounds" / "rounds.json"))}


def test_sigint_while_scoring_then_sigterm_during_a_round_end_every_process_and_the_next_start_resumes(tmp_path):
    studies, truth = tmp_path / "studies", {}
    for i in range(N):
        ph = make_phantom(700 + i, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0))
        write_phantom(ph, str(studies), f"ph_{i}", None)
        truth[f"ph_{i}"] = str(tmp_path / f"truth_{i}.nii.gz")
        nib.save(nib.Nifti1Image(ph.label, ph.affine), truth[f"ph_{i}"])
    write_synthetic_checkpoint("segresnet", str(tmp_path / "weights" / RELEASED_FILES["segresnet"]))
    conf = dict(CONF, weights_dir=str(tmp_path / "weights"), model_dir=str(tmp_path / "model"))
    scoring_at_start = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "true"}

    # 1. SIGINT while the start-up scoring subprocess is scoring.
    srv = Server(str(studies), dict(conf, **SLOW), str(tmp_path), env=scoring_at_start).wait_ready()
    first = _wait("the first score record", lambda: _records(studies), 300)
    _signal_and_wait_for_an_empty_session(srv, signal.SIGINT)
    log = open(srv.log_path).read()
    assert "SIGTERM to" in log and "-m scoring" in log.split("SIGTERM to", 1)[1].splitlines()[0], log[-3000:]
    kept = _records(studies)
    assert 1 <= len(kept) < N, f"the run was not cut in the middle: {sorted(kept)}"
    assert all(kept[k] == first[k] for k in first), "records stored before the signal are kept as they were"

    # 2. The next start scores only the images without a record, then a round is stopped by SIGTERM.
    srv = Server(str(studies), dict(conf, **LONG_TRAINING), str(tmp_path), env=scoring_at_start).wait_ready()
    try:
        records = _wait("every image scored", lambda: (lambda r: r if len(r) == N else None)(_records(studies)), 300)
        assert {k: records[k] for k in kept} == kept, "an image scored before the stop was scored again"
        published = tmp_path / "model" / "segresnet_finetuned.pth"
        write_synthetic_checkpoint("segresnet", str(published), seed=3)
        before = published.read_bytes()
        client = MONAILabelClient(srv.url, tmpdir=str(tmp_path))
        for name in ("ph_0", "ph_1"):
            client.save_label(name, truth[name], tag="final")
        client.train_start("round", {})
        _wait("round 1 to train", lambda: (tmp_path / "model" / "train_segresnet" / "round_001").exists(), 300)
        assert client.info()["suprem"]["rounds"]["current"]["round"] == 1
    except BaseException:
        srv.stop()
        raise
    _signal_and_wait_for_an_empty_session(srv, signal.SIGTERM)
    cut = _round_log(studies)[1]
    assert cut["status"] == "interrupted" and cut["label_ids"] == ["ph_0", "ph_1"], cut
    assert published.read_bytes() == before, "a round cut short published nothing"
    assert len(_records(studies)) == N

    # 3. The next start runs the interrupted round again: its labels are still new. (That it trains and
    # publishes is test_server_rounds' crash test; here the round starting is enough.)
    srv = Server(str(studies), conf, str(tmp_path)).wait_ready()
    try:
        rounds = _wait("round 2", lambda: (lambda r: r if 2 in r else None)(_round_log(studies)), 300, step=1)
        assert rounds[2]["trigger"] == "resumed round 1", rounds[2]
        assert rounds[2]["label_ids"] == ["ph_0", "ph_1"] and rounds[1]["status"] == "interrupted"
    finally:
        srv.stop()
