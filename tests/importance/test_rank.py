"""Offline ranking of a study folder: CSV by descending score, resumable, bad studies recorded."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from testing.phantoms import make_phantom, write_phantom
from lib.importance.rank import main
from lib.importance.scorer import SCORING_METHOD_VERSION
from lib.weights import RELEASED_FILES
from support import REPO, write_synthetic_checkpoint


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_rank_writes_a_priority_csv_and_a_rerun_scores_only_what_changed(tmp_path, caplog):
    studies = tmp_path / "studies"
    for i in range(3):
        write_phantom(make_phantom(80 + i, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(studies), f"v{i}", None)
    (studies / "bad.nii.gz").write_bytes(b"garbage")
    w = tmp_path / "w"
    write_synthetic_checkpoint("segresnet", str(w / RELEASED_FILES["segresnet"]))
    out = str(tmp_path / "ranking.csv")
    args = [str(studies), "--out", out, "--models", "segresnet", "--weights-dir", str(w),
            "--model-dir", str(tmp_path / "m"), "--preset", "demo", "--overlap", "0", "--no-progress",
            "--conf", "importance_mode", "reference"]  # the method record below is the reference's
    assert main(args) == 0  # any of the server's presets (demo: the offline demo's starter weights' grid)
    rows = _read(out)
    assert [r["id"] for r in rows][-1] == "bad" and "could not read" in rows[-1]["error"]
    scores = [float(r["score"]) for r in rows[:3]]
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in rows[:3]] == ["1", "2", "3"]
    assert all(r["organs_by_priority"] for r in rows[:3] if float(r["score"]) > 0)
    parts = os.listdir(out + ".parts")
    assert sorted(parts) == ["bad.json", "v0.json", "v1.json", "v2.json"]

    # Interrupted run: one record lost; a changed study: both redone, nothing else.
    os.remove(os.path.join(out + ".parts", "v1.json"))
    write_phantom(make_phantom(99, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(studies), "v2", None)
    caplog.clear()
    with caplog.at_level("INFO", logger="lib.importance.rank"):
        assert main(args) == 0
    assert any("4 studies, 2 already scored, 2 to score" in r.getMessage() for r in caplog.records)
    assert len(_read(out)) == 4

    # A record made by another scoring method (an older formula) is not current: scored again.
    part = os.path.join(out + ".parts", "v0.json")
    with open(part) as f:
        record = json.load(f)
    assert record["method"] == {"version": SCORING_METHOD_VERSION, "entropy": "positive", "normalise_score": False}
    record["method"]["version"] = SCORING_METHOD_VERSION - 1
    with open(part, "w") as f:
        json.dump(record, f)
    caplog.clear()
    with caplog.at_level("INFO", logger="lib.importance.rank"):
        assert main(args) == 0
    assert any("4 studies, 3 already scored, 1 to score" in r.getMessage() for r in caplog.records)


def _wait(what, predicate, timeout, proc):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the ranking ended before {what}: {proc.communicate()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}: {proc.communicate()}")


def _session_alive(sid):
    """Processes of session ``sid`` (the ranking and all it started, Ray's included), zombies left out."""
    alive = []
    for p in psutil.process_iter(["status", "cmdline"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(p.info["cmdline"] or [])[:100])
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


@pytest.mark.parametrize("engine, sig", [("inprocess", signal.SIGINT), ("ray", signal.SIGTERM)])
def test_a_ranking_stopped_mid_run_leaves_a_csv_of_what_it_scored_and_a_rerun_scores_the_rest(
    tmp_path, caplog, engine, sig
):
    if engine == "ray":
        pytest.importorskip("ray")
    studies = tmp_path / "studies"
    for i in range(3):
        write_phantom(make_phantom(90 + i, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(studies), f"v{i}", None)
    w = tmp_path / "w"
    write_synthetic_checkpoint("segresnet", str(w / RELEASED_FILES["segresnet"]))
    out = tmp_path / "ranking.csv"
    args = [str(studies), "--out", str(out), "--models", "segresnet", "--weights-dir", str(w),
            "--model-dir", str(tmp_path / "m"), "--no-progress"]
    # One volume at a time: the signal comes as the first record appears, with two volumes still to do.
    one_by_one = ["--overlap", "0", "--engine", engine] + (["--workers", "1"] if engine == "ray" else [])
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "lib.importance.rank", *args, *one_by_one], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    parts = out.parent / (out.name + ".parts")
    _wait("the first record", lambda: parts.is_dir() and any(parts.glob("*.json")), 300, proc)
    proc.send_signal(sig)  # Ctrl-C / kill
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "run the same command again" in err
    deadline = time.time() + 10
    while _session_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _session_alive(proc.pid), "a process of the ranking outlived it (Ray's included)"
    done = sorted(p.stem for p in parts.glob("*.json"))
    assert 1 <= len(done) < 3, f"the run was not stopped in the middle: {done}"
    assert sorted(r["id"] for r in _read(out)) == done, "the CSV lists what was scored before the stop"
    if engine == "ray":  # the re-run is the engine's own business (tests/importance/test_ray_engine.py)
        return

    caplog.clear()
    with caplog.at_level("INFO", logger="lib.importance.rank"):
        assert main(args + ["--overlap", "0"]) == 0
    assert any(f"3 studies, {len(done)} already scored, {3 - len(done)} to score" in r.getMessage()
               for r in caplog.records)
    assert sorted(r["id"] for r in _read(out)) == ["v0", "v1", "v2"]


def test_the_ranking_takes_the_servers_settings_through_the_servers_parser(tmp_path, capsys):
    from lib.config import parse_conf
    from lib.importance.configured import volume_scorer
    from lib.importance.rank import parser, ranking_config
    from support import synthetic_registry

    argv = ["studies", "--models", "segresnet", "--preset", "demo", "--overlap", "0.5", "--entropy", "binary",
            "--conf", "normalise_score", "true"]
    cfg = ranking_config(parser().parse_args(argv))
    assert cfg == parse_conf({"models": "segresnet", "preset": "demo", "overlap": "0.5", "entropy": "binary",
                              "normalise_score": "true", "use_pretrained_model": "false"})
    scorer = volume_scorer(cfg, synthetic_registry(tmp_path))
    assert (scorer.normalise_score, scorer.entropy, scorer.recipe.overlap) == (True, "binary", 0.5)
    for bad, says in ((["--models", "resnet"], "--conf models: unknown resnet"),
                      (["--labels", "atlas7"], "--conf labels 'atlas7'")):
        with pytest.raises(SystemExit):
            main(["studies", *bad])
        assert says in capsys.readouterr().err
