"""The fine-tuning crop follows the inference window: what a round learns is what the infer task shows.

A model trained on one field and slid over another learns where organs sit relative to a border that
inference moves (bench/RESULTS.md, issue 15 section 0: train Dice 0.83, 0.04 through the infer task).
"""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from lib.app import build_tasks
from lib.classes import CLASS_INDEX
from testing.phantoms import make_phantom, write_phantom
from lib.infers.segmentation import SuPreMSegmentation
from lib.networks import build_network, save_checkpoint
from lib.networks.inference import NetworkCache
from lib.trainers.segmentation import SuPreMTrainer
from lib.transforms.recipe import Recipe, training_transforms
from support import synthetic_registry

ORGANS = ["liver", "spleen", "stomach", "kidney_right", "kidney_left"]
# A coarse working grid (13x9x15) inside one window: each training crop is the whole padded volume, the
# set-up in which a window mismatch between training and inference broke the simulation.
RECIPE = Recipe(spacing=(9.0, 9.0, 9.0), roi=(16, 16, 16), overlap=0.0)
SEEDS = (11, 12)


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice over ORGANS of two class-index maps on one grid."""
    scores = []
    for organ in ORGANS:
        p, t = pred == CLASS_INDEX[organ], truth == CLASS_INDEX[organ]
        scores.append(2.0 * np.logical_and(p, t).sum() / max(p.sum() + t.sum(), 1))
    return float(np.mean(scores))


def _training_field(files: dict, roi):
    """(image, channel label) as the train task's transforms give them without the random parts."""
    data = Compose(training_transforms(RECIPE, [CLASS_INDEX[o] for o in ORGANS], roi, augment=False))(files)
    return data["image"], data["label"]


def _labels_of(probs: torch.Tensor) -> np.ndarray:
    classes = torch.tensor([CLASS_INDEX[o] for o in ORGANS])
    return torch.where(probs.max(0).values > 0.5, classes[probs.argmax(0)], 0).numpy()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A SegResNet trained a few steps on the train task's own crops and loss, published to the registry."""
    work = tmp_path_factory.mktemp("window")
    files = []
    for seed in SEEDS:
        write_phantom(make_phantom(seed, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(work / "studies"), f"ph_{seed}")
        files.append({"image": str(work / "studies" / f"ph_{seed}.nii.gz"),
                      "label": str(work / "studies" / "labels" / "final" / f"ph_{seed}.nii.gz")})
    registry = synthetic_registry(work)
    trainer = SuPreMTrainer("segresnet", registry, ORGANS, RECIPE, model_dir=str(work / "model"),
                            split_file=str(work / "split.json"))  # no roi: the recipe's window
    crops = Compose(training_transforms(RECIPE, trainer.class_indices, trainer.roi, num_samples=2))
    crops.set_random_state(0)
    torch.manual_seed(0)
    net, loss = build_network("segresnet"), trainer.loss_function(None)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for step in range(8):  # a few steps: the check is that inference reproduces training, not accuracy
        batch = crops(dict(files[step % len(files)]))
        logits = net(torch.stack([c["image"] for c in batch]))
        optimizer.zero_grad()
        loss(logits, torch.stack([c["label"] for c in batch])).backward()
        optimizer.step()
    save_checkpoint(net.eval(), registry.published_path("segresnet"))
    return files, registry, trainer, net


def test_the_trainer_crops_the_window_the_infer_task_slides(trained, tmp_path):
    _, _, trainer, _ = trained
    assert trainer.roi == RECIPE.roi
    tasks = build_tasks(str(tmp_path / "app"), str(tmp_path / "studies"), {
        "models": "segresnet", "weights_dir": str(tmp_path / "none"), "use_pretrained_model": "false"})
    assert tasks.cfg.train_roi is None and tasks.info()["suprem"]["conf"]["train_roi"] == [96, 96, 96]


def test_the_infer_task_shows_the_model_what_it_was_trained_on(trained):
    """Probabilities through the infer task equal the network's on its training field, and so the Dice
    through the infer task is within a few points of the Dice on the training field."""
    files, registry, trainer, net = trained
    infer = SuPreMSegmentation(["segresnet"], registry, ORGANS, RECIPE, NetworkCache())
    field_dice, served_dice = [], []
    for item in files:
        image, label = _training_field(item, trainer.roi)
        with torch.no_grad():
            field_probs = torch.sigmoid(net(image[None])[0][[CLASS_INDEX[o] - 1 for o in ORGANS]])
        served = infer.run_pre_transforms({"image": item["image"]}, infer.pre_transforms())["image"]
        served_probs = torch.as_tensor(infer.probabilities(served, {}, "cpu"))
        grid = served_probs.shape[1:]
        start = [(w - g) // 2 for w, g in zip(trainer.roi, grid)]  # where the padding put the working grid
        crop = tuple(slice(s, s + g) for s, g in zip(start, grid))
        torch.testing.assert_close(served_probs, field_probs[(slice(None),) + crop], atol=2e-4, rtol=0)

        truth = np.zeros(field_probs.shape[1:], np.int64)
        for i, organ in enumerate(ORGANS):
            truth[label[i].numpy() > 0] = CLASS_INDEX[organ]
        field_dice.append(_dice(_labels_of(field_probs), truth))
        out, _ = infer({"image": item["image"], "device": "cpu"})
        served_dice.append(_dice(np.asarray(nib.load(out).dataobj), np.asarray(nib.load(item["label"]).dataobj)))
        assert np.isin(np.asarray(nib.load(out).dataobj), [CLASS_INDEX[o] for o in ORGANS]).any()
    assert abs(np.mean(served_dice) - np.mean(field_dice)) < 0.05, (served_dice, field_dice)


def test_a_working_grid_smaller_than_the_window_is_warned_about(tmp_path, caplog):
    write_phantom(make_phantom(13, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(tmp_path), "ph_13")
    files = {"image": str(tmp_path / "ph_13.nii.gz"), "label": str(tmp_path / "labels" / "final" / "ph_13.nii.gz")}
    classes = [CLASS_INDEX[o] for o in ORGANS]
    with caplog.at_level(logging.WARNING, logger="lib.transforms.checks"):
        Compose(training_transforms(RECIPE, classes, (8, 8, 8), augment=False))(dict(files))
    assert not [r for r in caplog.records if "smaller than the training window" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="lib.transforms.checks"):
        Compose(training_transforms(RECIPE, classes, RECIPE.roi, augment=False))(dict(files))
    warned = [r.getMessage() for r in caplog.records if "smaller than the training window" in r.getMessage()]
    assert len(warned) == 1 and "ph_13" in warned[0] and "(16, 16, 16)" in warned[0], warned


def test_every_crop_has_the_window_shape_when_its_axial_plane_is_not_square(tmp_path):
    """A quarter turn of a 32x24x32 crop would make it 24x32x32, and the batch of crops then cannot be
    stacked (the demo's window trains two crops a step)."""
    write_phantom(make_phantom(14, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(tmp_path), "ph_14")
    files = {"image": str(tmp_path / "ph_14.nii.gz"), "label": str(tmp_path / "labels" / "final" / "ph_14.nii.gz")}
    roi = (16, 8, 16)
    crops = Compose(training_transforms(Recipe(spacing=(4.0, 4.0, 4.0), roi=roi), [CLASS_INDEX["liver"]], roi,
                                        num_samples=2))
    turned = 0
    for seed in range(40):  # a quarter turn has probability 0.1 * 2/3 per draw
        crops.set_random_state(seed)
        batch = crops(dict(files))
        assert [tuple(c["image"].shape[1:]) for c in batch] == [roi] * 2
        assert [tuple(c["label"].shape[1:]) for c in batch] == [roi] * 2
        turned += any("RandRotate90d" in str(op.get("class", "")) and op.get("do_transforms")
                      for c in batch for op in c["image"].applied_operations)
    assert turned, "no draw turned the volume: the test did not exercise the rotation"


def test_validation_slides_the_recipes_window_overlap_blending_and_batch(tmp_path):
    recipe = RECIPE.with_overrides(overlap=0.6, sw_batch_size=3)
    trainer = SuPreMTrainer("segresnet", synthetic_registry(tmp_path), ORGANS, recipe, model_dir=str(tmp_path / "m"),
                            split_file=str(tmp_path / "split.json"), roi=(8, 8, 8))
    inferer = trainer.val_inferer(None)
    slid = (tuple(inferer.roi_size), inferer.overlap, str(inferer.mode), inferer.sw_batch_size)
    assert slid == (recipe.roi, 0.6, str(recipe.blend), 3)
