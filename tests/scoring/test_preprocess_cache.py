"""Pre-processed volumes are reused by the next round, and rebuilt when the recipe or the file changes.

"Reused" is proven by altering the cached entry on disk: a later round that reads the cache gets the
altered tensor, one that pre-processes again gets the real one.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monailabel.tasks.train.basic_train import Context

from lib.classes import LABEL_SETS
from testing.phantoms import make_phantom, write_phantom
from lib.importance.scorer import VolumeScorer
from lib.trainers.segmentation import SuPreMTrainer
from lib.transforms.recipe import PRESETS
from support import synthetic_registry

SHAPE = (48, 48, 32)
SPACING = (3.0, 3.0, 4.0)
MARK = 0.123


def _entries(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".pt"))


def _key_dirs(root, kind):
    return sorted(os.listdir(os.path.join(root, kind)))


def _mark(entry, key):
    """Overwrite the cached ``key`` tensor of an entry with a constant (what a cache hit will return)."""
    data = torch.load(entry, weights_only=True)
    data[key] = torch.full_like(torch.as_tensor(data[key]), MARK)
    torch.save(data, entry)


@pytest.fixture
def registry(tmp_path):
    reg = synthetic_registry(tmp_path)
    return reg


def _scorer(registry, recipe, cache):
    return VolumeScorer(["segresnet"], registry, LABEL_SETS["atlas9"], recipe, device="cpu", cache_dir=cache)


def test_scoring_reuses_resampled_volumes_and_rebuilds_after_a_recipe_or_file_change(tmp_path, registry):
    studies = tmp_path / "studies"
    img, _ = write_phantom(make_phantom(3, shape=SHAPE, spacing_mm=SPACING), str(studies), "v0", None)
    cache = str(tmp_path / "cache")
    recipe = PRESETS["recipe"]

    first = _scorer(registry, recipe, cache).preprocess(img)
    (key,) = _key_dirs(cache, "score")
    (entry,) = _entries(os.path.join(cache, "score", key))
    uncached = _scorer(registry, recipe, None).preprocess(img)
    assert torch.equal(torch.as_tensor(first), torch.as_tensor(uncached))

    # Next round (a new scorer, as in a new process): the entry on disk is what it gets.
    _mark(entry, "image")
    again = _scorer(registry, recipe, cache).preprocess(img)
    assert torch.all(torch.as_tensor(again) == MARK), "the next round pre-processed the volume again"

    # Recipe change: a new key; the old entries are gone and the volume is pre-processed anew.
    coarse = recipe.with_overrides(spacing=(3.0, 3.0, 3.0))
    rebuilt = _scorer(registry, coarse, cache).preprocess(img)
    (key2,) = _key_dirs(cache, "score")
    assert key2 != key and not os.path.exists(entry)
    assert not torch.all(torch.as_tensor(rebuilt) == MARK)
    assert tuple(rebuilt.shape) != tuple(first.shape)

    # The same path with new content (a replaced image) is not served from the cache.
    _mark(_entries(os.path.join(cache, "score", key2))[0], "image")
    write_phantom(make_phantom(4, shape=SHAPE, spacing_mm=SPACING), str(studies), "v0", None)
    fresh = _scorer(registry, coarse, cache).preprocess(img)
    assert not torch.all(torch.as_tensor(fresh) == MARK)
    assert len(_entries(os.path.join(cache, "score", key2))) == 2


def _trainer(tmp_path, registry, cache, recipe):
    return SuPreMTrainer(
        "segresnet",
        registry,
        LABEL_SETS["atlas9"],
        recipe,
        model_dir=str(tmp_path / "train"),
        split_file=str(tmp_path / "split.json"),
        roi=(32, 32, 32),
        cache_dir=cache,
    )


def _context():
    c = Context()
    c.multi_gpu = False
    c.request = {}
    return c


def test_training_data_is_reused_across_rounds_and_a_revised_label_is_loaded_again(tmp_path, registry):
    studies = tmp_path / "studies"
    ph = make_phantom(5, shape=SHAPE, spacing_mm=SPACING)
    img, _ = write_phantom(ph, str(studies), "v0", None)
    label = str(tmp_path / "labels" / "v0.nii.gz")
    os.makedirs(os.path.dirname(label))
    nib.save(nib.Nifti1Image(ph.label, ph.affine), label)
    datalist = [{"image": img, "label": label}]
    cache = str(tmp_path / "cache")
    recipe = PRESETS["recipe"]

    ds, _ = _trainer(tmp_path, registry, cache, recipe).dataset(_context(), datalist, is_train=False)
    item = ds[0]
    (key,) = _key_dirs(cache, "val")
    (entry,) = _entries(os.path.join(cache, "val", key))
    assert item["label"].shape[0] == len(LABEL_SETS["atlas9"])

    # Round 2, another backbone or another process: read from disk.
    _mark(entry, "image")
    ds2, _ = _trainer(tmp_path, registry, cache, recipe).dataset(_context(), datalist, is_train=False)
    assert torch.all(torch.as_tensor(ds2[0]["image"]) == MARK)

    # Training crops are random: only the part before the first random transform is cached.
    tr, _ = _trainer(tmp_path, registry, cache, recipe).dataset(_context(), datalist, is_train=True)
    crops = tr[0]
    assert isinstance(crops, list) and tuple(crops[0]["image"].shape[1:]) == (32, 32, 32)
    assert len(_entries(os.path.join(cache, "train", _key_dirs(cache, "train")[0]))) == 1

    # The annotator revises the label in place: the item is pre-processed again, with the new label.
    revised = ph.label.copy()
    revised[revised == 1] = 0  # spleen removed
    nib.save(nib.Nifti1Image(revised, ph.affine), label)
    ds3, _ = _trainer(tmp_path, registry, cache, recipe).dataset(_context(), datalist, is_train=False)
    item3 = ds3[0]
    assert not torch.all(torch.as_tensor(item3["image"]) == MARK)
    assert float(item["label"][0].sum()) > 0 and float(item3["label"][0].sum()) == 0  # channel 0 = spleen

    # A recipe change: new key, old entries removed.
    _trainer(tmp_path, registry, cache, recipe.with_overrides(a_min=-200.0)).dataset(_context(), datalist, is_train=False)[0][0]
    assert _key_dirs(cache, "val") != [key] and not os.path.exists(entry)
    assert np.isfinite(float(item3["image"].mean()))
