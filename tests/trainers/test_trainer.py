"""The fine-tuning train task on CPU: publishes atomically in the released format, keeps its split."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from monailabel.datastore.local import LocalDatastore

from lib.classes import LABEL_SETS
from testing.phantoms import make_phantom, write_phantom
from lib.networks import build_network, load_checkpoint
from lib.trainers.segmentation import SuPreMTrainer
from lib.trainers.split import persistent_split
from lib.transforms.recipe import PRESETS
from lib.weights import RELEASED_FILES
from support import synthetic_registry

SHAPE = (64, 64, 48)


def _studies(folder, seeds):
    for s in seeds:
        write_phantom(make_phantom(s, shape=SHAPE, spacing_mm=(3.0, 3.0, 4.0)), str(folder), f"ph_{s}")
    return LocalDatastore(str(folder), extensions=("*.nii.gz",), auto_reload=False)


def _trainer(tmp_path, registry, cache_dir=None):
    return SuPreMTrainer(
        "segresnet",
        registry,
        LABEL_SETS["atlas25"],
        PRESETS["recipe"],
        model_dir=str(tmp_path / "train"),
        split_file=str(tmp_path / "split.json"),
        roi=(32, 32, 32),
        max_epochs=1,
        num_samples=1,
        val_fraction=0.34,
        cache_dir=cache_dir,
    )


@pytest.fixture
def registry(tmp_path):
    reg = synthetic_registry(tmp_path)
    return reg


def test_training_publishes_a_released_format_model_that_differs_from_the_start(tmp_path, registry):
    ds = _studies(tmp_path / "studies", [1, 2, 3])
    start = build_network("segresnet")
    load_checkpoint(start, registry.current_path("segresnet"))
    cache = tmp_path / "cache"
    result = _trainer(tmp_path, registry, str(cache))({"name": "t1", "device": "cpu"}, ds)
    # The resampled volumes stay on disk for the next round: 2 training and 1 validation image.
    assert [len(os.listdir(d)) for d in (cache / "train").iterdir()] == [2]
    assert [len(os.listdir(d)) for d in (cache / "val").iterdir()] == [1]

    published = registry.published_path("segresnet")
    assert result["published"] == published and registry.current_path("segresnet") == published
    raw = torch.load(published, map_location="cpu", weights_only=True)
    assert set(raw) >= {"net"} and all(k.startswith("module.") for k in raw["net"])
    trained = build_network("segresnet")
    load_checkpoint(trained, published)  # every released key, right shapes
    diffs = [float((a - b).abs().max()) for a, b in zip(start.state_dict().values(), trained.state_dict().values())]
    assert max(diffs) > 0, "training changed the weights"
    side = json.load(open(published + ".json"))
    assert side["labels_used"] == 3 and side["trained_from"].endswith(RELEASED_FILES["segresnet"])
    assert [f for f in os.listdir(os.path.dirname(published)) if f.endswith(".tmp")] == []
    assert registry.info("segresnet")["source"] == "fine-tuned"


def test_failed_training_leaves_the_previous_model_in_place(tmp_path, registry):
    ds = _studies(tmp_path / "studies", [4, 5])
    published = registry.published_path("segresnet")
    os.makedirs(os.path.dirname(published), exist_ok=True)
    shutil.copyfile(registry.current_path("segresnet"), published)
    before = open(published, "rb").read()
    with open(tmp_path / "studies" / "labels" / "final" / "ph_4.nii.gz", "wb") as f:
        f.write(b"not a label")  # a broken label makes the data loader fail mid-training
    with pytest.raises(Exception):
        _trainer(tmp_path, registry)({"name": "t2", "device": "cpu", "dataset": "Dataset"}, ds)
    assert open(published, "rb").read() == before


def test_split_keeps_every_image_on_its_side_when_new_labels_arrive(tmp_path):
    split = str(tmp_path / "split.json")
    first = [{"image": f"/x/img_{i}.nii.gz", "label": "l"} for i in range(20)]
    train1, val1 = persistent_split(first, split, val_fraction=0.3)
    assert train1 and val1 and len(train1) + len(val1) == 20
    more = first + [{"image": f"/x/img_{i}.nii.gz", "label": "l"} for i in range(20, 40)]
    train2, val2 = persistent_split(list(reversed(more)), split, val_fraction=0.3)
    names = lambda items: {os.path.basename(d["image"]) for d in items}  # noqa: E731
    assert names(train1) <= names(train2) and names(val1) <= names(val2)
    assert len(train2) + len(val2) == 40
    sides = json.load(open(split))["sides"]
    assert len(sides) == 40


def test_without_a_validation_split_the_last_weights_are_published_not_the_best_training_crop(tmp_path, registry):
    """MONAI Label keeps ``model.pt`` at the best *training* Dice when nothing is validated: a model chosen by
    its fit to training crops. The trainer publishes the last weights then, and the best on validation
    otherwise."""
    from lib.trainers.segmentation import BEST_CHECKPOINT, FINAL_CHECKPOINT

    trainer = _trainer(tmp_path, registry)
    run = os.path.join(trainer.train_dir, "r1")
    os.makedirs(run)
    for name in (BEST_CHECKPOINT, FINAL_CHECKPOINT):
        open(os.path.join(run, name), "w").close()
    assert trainer._best_checkpoint("r1", validated=False) == os.path.join(run, FINAL_CHECKPOINT)
    assert trainer._best_checkpoint("r1", validated=True) == os.path.join(run, BEST_CHECKPOINT)
    os.remove(os.path.join(run, FINAL_CHECKPOINT))
    assert trainer._best_checkpoint("r1", validated=False) == os.path.join(run, BEST_CHECKPOINT)
