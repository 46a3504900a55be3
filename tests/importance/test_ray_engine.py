"""Batch scoring on Ray (local mode, 2 CPU workers): same records as in-process; a killed worker loses
at most its volume, and a re-run scores only what is missing."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time

import pytest
import torch
from monailabel.datastore.local import LocalDatastore

from lib.classes import LABEL_SETS
from testing.phantoms import make_phantom, write_phantom
from lib.importance.engines import InProcessEngine, RayEngine, init_ray
from lib.importance.records import INFO_KEY
from lib.scoring.importance import ImportanceScoring
from lib.importance.rank import rank_folder
from lib.importance.scorer import VolumeScorer
from lib.transforms.recipe import PRESETS
from support import synthetic_registry

ray = pytest.importorskip("ray")

SHAPE = (48, 48, 32)
SPACING = (3.0, 3.0, 4.0)
# What must match between engines (timings and dates may differ).
SAME = ("score", "organs", "priority", "attention_ml", "heat", "models", "entropy", "normalised", "file", "error")


@pytest.fixture(scope="module")
def local_ray():
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def scorer(tmp_path):
    reg = synthetic_registry(tmp_path)
    recipe = PRESETS["recipe"].with_overrides(overlap=0.0)
    return VolumeScorer(["segresnet"], reg, LABEL_SETS["atlas25"], recipe, device="cpu")


def _studies(folder, n, bad=False):
    for i in range(n):
        write_phantom(make_phantom(40 + i, shape=SHAPE, spacing_mm=SPACING), str(folder), f"v{i}", None)
    if bad:
        (folder / "broken.nii.gz").write_bytes(b"not a nifti file")
    return str(folder)


def _same(rec):
    return {k: rec.get(k) for k in SAME}


def test_ray_local_scores_a_folder_like_the_inprocess_path(tmp_path, local_ray):
    # The demo's coarse grid, four windows a pass: the engines are compared, not the recipe's grid.
    scorer = VolumeScorer(["segresnet"], synthetic_registry(tmp_path), LABEL_SETS["atlas25"],
                          PRESETS["demo"].with_overrides(overlap=0.0), device="cpu")
    studies = _studies(tmp_path / "studies", 4, bad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each 1-CPU Ray worker: same kernels, same numbers
    try:
        here = rank_folder(scorer, studies, str(tmp_path / "here.csv"), progress=False).records
    finally:
        torch.set_num_threads(threads)
    engine = RayEngine(scorer, workers=2, cpus_per_worker=1)
    run = rank_folder(scorer, studies, str(tmp_path / "ray.csv"), progress=False, engine=engine)
    there = run.records

    assert sorted(here) == sorted(there) == ["broken", "v0", "v1", "v2", "v3"]
    for image_id in here:
        assert _same(there[image_id]) == _same(here[image_id]), image_id
    assert "error" in there["broken"] and all("score" in there[f"v{i}"] for i in range(4))
    with open(tmp_path / "here.csv") as a, open(tmp_path / "ray.csv") as b:
        assert a.read() == b.read()

    last = run.summary
    assert last["engine"] == "ray" and last["workers"] == 2 and last["lost"] == []
    stats = last["worker_stats"]
    assert len({s["pid"] for s in stats}) == 2 and sum(s["volumes"] for s in stats) == 5
    # Backbones are loaded once per worker, not once per volume.
    assert all(s["networks_loaded"] == 1 for s in stats if s["volumes"])
    # Each worker loaded every volume after its first while it scored the one before.
    assert sum(s["loaded_ahead"] for s in stats) == 5 - sum(1 for s in stats if s["volumes"])

    # The server's scoring method with the Ray engine stores the same records in the datastore.
    ds_dir = tmp_path / "datastore"
    shutil.copytree(studies, ds_dir)  # copytree keeps mtimes: same file stamps
    ds = LocalDatastore(str(ds_dir), extensions=("*.nii.gz",), auto_reload=False)
    run = ImportanceScoring(scorer, engine=RayEngine(scorer, workers=2))({}, ds)
    assert run["engine"] == "ray" and run["scored"] == 4 and run["failed"] == 1 and run["lost"] == []
    for image_id in ("v0", "v1", "v2", "v3"):
        stored = ds.get_image_info(image_id)[INFO_KEY]
        assert _same(stored) == _same(here[image_id]), image_id


def _kill_a_worker_mid_run(scorer, studies, out, engine):
    """Run the ranking on ``engine`` in a thread; SIGKILL worker 0 once a first volume is stored."""
    parts = out + ".parts"
    result = {}
    run = threading.Thread(target=lambda: result.update(run=rank_folder(scorer, studies, out, False, engine)))
    run.start()
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.isdir(parts) and os.listdir(parts)):
        time.sleep(0.1)
    assert os.listdir(parts), "no volume was scored"
    victim = engine.worker_info[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    run.join(timeout=300)
    assert not run.is_alive()
    return victim, result["run"]


def test_a_killed_worker_is_restarted_and_its_volume_retried_by_default(tmp_path, scorer, local_ray):
    studies = _studies(tmp_path / "studies", 4)
    out = str(tmp_path / "ranking.csv")
    victim, run = _kill_a_worker_mid_run(scorer, studies, out, RayEngine(scorer, workers=2))
    last, records = run.summary, run.records
    assert last["lost"] == [] and last["not_started"] == [], last
    assert sorted(records) == [f"v{i}" for i in range(4)] and all("score" in r for r in records.values())
    assert victim not in [s["pid"] for s in last["worker_stats"]] and len(last["worker_stats"]) == 2


def test_a_killed_worker_loses_at_most_its_volume_and_a_rerun_scores_only_the_rest(tmp_path, scorer, local_ray, caplog):
    studies = _studies(tmp_path / "studies", 6)
    out = str(tmp_path / "ranking.csv")
    parts = out + ".parts"
    victim, first = _kill_a_worker_mid_run(scorer, studies, out, RayEngine(scorer, workers=2, retries=0))
    records_first = first.records
    result = {"records": records_first}

    last = first.summary
    stats = last["worker_stats"]
    assert victim not in [s["pid"] for s in stats], "the killed worker still answered"
    lost = last["lost"] + last["not_started"]
    assert len(lost) <= 1, f"the killed worker took more than its one volume: {lost}"
    written = sorted(f[: -len(".json")] for f in os.listdir(parts))
    assert sorted(written + lost) == [f"v{i}" for i in range(6)]
    assert sorted(result["records"]) == written

    # Re-run (in-process here; Ray does the same): only the lost volume is scored, nothing else is touched.
    stamps = {f: os.stat(os.path.join(parts, f)).st_mtime_ns for f in os.listdir(parts)}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lib.importance.rank"):
        records = rank_folder(scorer, studies, out, False, InProcessEngine(scorer)).records
    assert any(
        f"6 studies, {len(written)} already scored, {len(lost)} to score" in r.getMessage() for r in caplog.records
    )
    assert sorted(records) == [f"v{i}" for i in range(6)] and all("score" in r for r in records.values())
    assert {f: os.stat(os.path.join(parts, f)).st_mtime_ns for f in stamps} == stamps


@pytest.mark.parametrize("engine", ["inprocess", "ray"])
def test_an_image_labelled_during_a_run_is_not_scored(tmp_path, scorer, engine, request):
    """Annotators keep saving while a round re-scores the pool (in another process, whose view of the
    datastore is older): an image labelled meanwhile is not scored."""
    studies = _studies(tmp_path / "studies", 3)
    ds = LocalDatastore(studies, extensions=("*.nii.gz",), auto_reload=False)  # the round's view
    server = LocalDatastore(studies, extensions=("*.nii.gz",), auto_reload=False)  # the server's
    label = tmp_path / "v2_label.nii.gz"
    shutil.copyfile(os.path.join(studies, "v2.nii.gz"), label)
    real = scorer.score_image
    if engine == "ray":
        request.getfixturevalue("local_ray")
        # Saved after the round listed its pool (its view still has v2 unlabelled), before v2 started.
        server.save_label("v2", str(label), "final", {})
        assert "v2" in ds.get_unlabeled_images()
        scoring = ImportanceScoring(scorer, engine=RayEngine(scorer, workers=1), recheck_s=0)
    else:
        def score_then_annotator_saves(image, pre_seconds):  # saved while the first volume is being scored
            out = real(image, pre_seconds)
            if not server.get_labeled_images():
                server.save_label("v2", str(label), "final", {})
            return out

        scorer.score_image = score_then_annotator_saves
        scoring = ImportanceScoring(scorer, recheck_s=0)
    try:
        run = scoring({}, ds)
    finally:
        scorer.score_image = real
    assert run["scored"] == 2 and run["labelled_meanwhile"] == 1, run
    assert INFO_KEY not in ds.get_image_info("v2")
    assert all(INFO_KEY in ds.get_image_info(i) for i in ("v0", "v1"))
