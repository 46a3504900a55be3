"""One volume ahead: the next volume is loaded while the current one is scored (in-process engine and each
Ray worker); same records as one at a time, failures and turned-down volumes handled, stage timings kept."""

from __future__ import annotations

import threading

import pytest

from lib.classes import LABEL_SETS
from testing.phantoms import make_phantom, write_phantom
from lib.importance.engines import InProcessEngine, ScoringWorker, score_one
from lib.importance.scorer import VolumeScorer
from lib.transforms.recipe import PRESETS
from support import synthetic_registry

SHAPE = (32, 32, 24)  # a 64^3 working grid at 1.5 mm: one 64^3 window (the order, not the size, is tested)
SPACING = (3.0, 3.0, 4.0)
SAME = ("score", "organs", "priority", "attention_ml", "heat", "models", "entropy", "normalised", "file", "error")


@pytest.fixture
def scorer(tmp_path):
    reg = synthetic_registry(tmp_path)
    recipe = PRESETS["recipe"].with_overrides(overlap=0.0, roi=(64, 64, 64))
    return VolumeScorer(["segresnet"], reg, LABEL_SETS["atlas25"], recipe, device="cpu")


def _jobs(folder, n, broken_at=None):
    """(id, path) of n phantoms; a file that is not a NIfTI at position ``broken_at``."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(n):
        write_phantom(make_phantom(60 + i, shape=SHAPE, spacing_mm=SPACING), str(folder), f"v{i}", None)
        jobs.append((f"v{i}", str(folder / f"v{i}.nii.gz")))
    if broken_at is not None:
        (folder / "broken.nii.gz").write_bytes(b"not a nifti file")
        jobs.insert(broken_at, ("broken", str(folder / "broken.nii.gz")))
    return jobs


def _run(engine, jobs, still_wanted=None):
    records = {}
    summary = engine.run(jobs, lambda image_id, record: records.__setitem__(image_id, record), still_wanted)
    return records, summary


def test_prefetch_gives_the_records_of_one_at_a_time_with_stage_timings_and_a_broken_volume_its_error(
    tmp_path, scorer
):
    jobs = _jobs(tmp_path / "studies", 2, broken_at=1)
    ahead, _ = _run(InProcessEngine(scorer), jobs)
    one_by_one, _ = _run(InProcessEngine(scorer, prefetch=False), jobs)
    assert list(ahead) == ["v0", "broken", "v1"]  # the run went on after the broken volume
    assert "could not read" in ahead["broken"]["error"] and ahead["broken"]["file"]
    for image_id, record in one_by_one.items():
        assert {k: ahead[image_id].get(k) for k in SAME} == {k: record.get(k) for k in SAME}, image_id
    assert ahead["v0"]["heat"] != ahead["v1"]["heat"], "two different volumes"
    for record in (ahead["v0"], ahead["v1"]):
        stages = record["stages"]
        assert list(stages) == ["pre", "segresnet", "masks", "attention"]
        assert all(v >= 0 for v in stages.values()) and stages["pre"] > 0 and stages["segresnet"] > 0
        assert sum(stages.values()) == pytest.approx(record["seconds"], rel=0.1, abs=0.05), record


def test_the_next_volume_is_loaded_while_the_current_one_is_scored(tmp_path, scorer):
    jobs = _jobs(tmp_path / "studies", 2)
    events, loading = [], {path: threading.Event() for _, path in jobs}
    images = {}
    preprocess, score_image = scorer.preprocess, scorer.score_image

    def recorded_preprocess(path):
        events.append(("load starts", path))
        loading[path].set()
        image = preprocess(path)
        images[id(image)] = path
        return image

    def recorded_score_image(image, pre_seconds):
        path = images[id(image)]
        events.append(("scoring starts", path))
        out = score_image(image, pre_seconds)
        following = [p for _, p in jobs][[p for _, p in jobs].index(path) + 1:]
        if following:
            # Not a timing: give a following load up to 60 s to begin; with prefetch it already has.
            loading[following[0]].wait(timeout=60)
        events.append(("scoring ends", path))
        return out

    scorer.preprocess, scorer.score_image = recorded_preprocess, recorded_score_image
    records, _ = _run(InProcessEngine(scorer), jobs)
    assert sorted(records) == ["v0", "v1"] and all("score" in r for r in records.values())
    for (_, path), (_, following) in zip(jobs, jobs[1:]):
        assert events.index(("load starts", following)) < events.index(("scoring ends", path)), events
        assert events.index(("scoring starts", path)) < events.index(("scoring starts", following)), events
    assert [e for e in events if e[0] == "load starts"] == [("load starts", p) for _, p in jobs]


def test_a_volume_turned_down_is_not_scored_even_when_it_was_loaded_ahead(tmp_path, scorer):
    jobs = _jobs(tmp_path / "studies", 4)
    scored = []
    score_image = scorer.score_image
    scorer.score_image = lambda image, pre: scored.append(image) or score_image(image, pre)
    labelled = {"v1"}  # labelled before the run

    def still_wanted(image_id):
        if len(scored) == 2:
            labelled.add("v3")  # labelled while v2 is scored, after v3 started loading
        return image_id not in labelled

    records, summary = _run(InProcessEngine(scorer), jobs, still_wanted)
    assert sorted(records) == ["v0", "v2"] and len(scored) == 2
    assert summary["dropped"] == ["v1", "v3"]


def test_a_ray_worker_loads_the_volume_it_is_told_of_while_it_scores(tmp_path, scorer):
    """The Ray actor's class, in this process: ``score(path, next_path)``."""
    jobs = _jobs(tmp_path / "studies", 1, broken_at=1)
    worker = ScoringWorker(scorer.spec())
    paths = [p for _, p in jobs]
    got = [worker.score(paths[0], paths[1]), worker.score(paths[1])]
    assert worker.ahead.hits == 1 and worker.stats()["loaded_ahead"] == 1
    expected = score_one(scorer, paths[0])
    assert {k: got[0].get(k) for k in SAME} == {k: expected.get(k) for k in SAME}
    assert "could not read" in got[1]["error"] and "score" in got[0]


def test_a_scorer_built_from_its_spec_says_which_backbone_has_no_model_file(tmp_path):
    # What a Ray worker builds: fixed model files; a backbone without one is named, not a crash.
    from lib.classes import LABEL_SETS
    from lib.importance.scorer import ScorerSpec
    from lib.transforms.recipe import PRESETS
    from support import synthetic_registry

    registry = synthetic_registry(tmp_path)
    spec = ScorerSpec(["segresnet", "unet"], {"segresnet": registry.current_path("segresnet")}, LABEL_SETS["atlas9"],
                      PRESETS["demo"])
    scorer = spec.build(device="cpu")
    assert scorer.active() == ["segresnet"]
    assert scorer.backbones.why_unavailable() == "segresnet: no weights; unet: no model file given"
