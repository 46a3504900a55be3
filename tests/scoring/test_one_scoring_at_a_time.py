"""One scoring of a pool at a time: a run waits while another holds the pool's scoring lock, and a run that
finds a newer model published stops, leaving the rest to the run that scores with it."""

from __future__ import annotations

import threading

from filelock import FileLock
from monailabel.datastore.local import LocalDatastore

from lib.classes import LABEL_SETS
from testing.phantoms import make_phantom, write_phantom
from lib.importance.records import INFO_KEY
from lib.importance.scorer import VolumeScorer
from lib.scoring.importance import ImportanceScoring
from lib.transforms.recipe import PRESETS
from support import synthetic_registry, write_synthetic_checkpoint


def _pool(tmp_path, n=3):
    studies = tmp_path / "studies"
    for i in range(n):
        write_phantom(make_phantom(40 + i, shape=(32, 32, 24), spacing_mm=(4.0, 4.0, 6.0)), str(studies), f"p{i}", None)
    registry = synthetic_registry(tmp_path)
    scorer = VolumeScorer(["segresnet"], registry, LABEL_SETS["atlas9"], PRESETS["demo"].with_overrides(overlap=0.0),
                          device="cpu")
    datastore = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    return registry, scorer, datastore


def _models(datastore):
    return {i: (datastore.get_image_info(i).get(INFO_KEY) or {}).get("models") for i in sorted(datastore.list_images())}


def test_a_run_that_finds_a_newer_model_stops_and_the_next_run_scores_all_with_it(tmp_path):
    registry, scorer, datastore = _pool(tmp_path)
    old = scorer.versions()
    store = datastore.update_image_info

    def store_then_publish(image_id, info):  # a round publishes while the first volume is stored
        store(image_id, info)
        write_synthetic_checkpoint("segresnet", registry.published_path("segresnet"), seed=3)

    datastore.update_image_info = store_then_publish
    first = ImportanceScoring(scorer)({}, datastore)
    datastore.update_image_info = store
    new = scorer.versions()
    assert new != old and (first["scored"], first["superseded"], first["labelled_meanwhile"]) == (1, 2, 0), first
    assert sorted(_models(datastore).values(), key=str) == [None, None, old]
    second = ImportanceScoring(scorer)({}, datastore)
    assert second["scored"] == 3 and second["superseded"] == 0
    assert list(_models(datastore).values()) == [new] * 3


def test_a_run_waits_while_another_scoring_of_the_pool_holds_its_lock(tmp_path):
    _, scorer, datastore = _pool(tmp_path, n=2)
    lock_path = str(tmp_path / "scoring.lock")
    other = FileLock(lock_path)  # another process's run, as far as this one can tell (its own descriptor)
    other.acquire()
    result = {}
    run = threading.Thread(target=lambda: result.update(ImportanceScoring(scorer, lock_path=lock_path)({}, datastore)))
    run.start()
    run.join(5)
    assert run.is_alive() and _models(datastore) == {"p0": None, "p1": None}, "it waits, scoring nothing"
    other.release()
    run.join(120)
    assert result["scored"] == 2
