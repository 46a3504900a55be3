"""Starter weights: SegResNet trained from scratch on labelled phantoms with the app's own train task, when
no released weights can be had (the offline demo) or as the benchmarks' starting model."""

from __future__ import annotations

import math
import os
import shutil
from typing import Optional, Sequence

from monailabel.interfaces.datastore import Datastore

from lib.transforms.recipe import Recipe
from lib.weights import WeightsRegistry

BACKBONE = "segresnet"
# A starter learns from nothing: a larger step than fine-tuning's.
STARTER_LR = 3e-3


def train_starter(
    datastore: Datastore,
    registry: WeightsRegistry,
    labels: Sequence[str],
    recipe: Recipe,
    work_dir: str,
    steps: int,
    crops_per_step: int = 2,
    lr: float = STARTER_LR,
    seed: Optional[int] = None,
    publish_to: Optional[str] = None,
    device: str = "cpu",
    source: str = "starter (phantoms)",
) -> str:
    """Train SegResNet on ``datastore``'s final labels for about ``steps`` steps of ``crops_per_step`` crops
    of the recipe's window (whole epochs over the labelled images, no validation, fp32), from the
    registry's current weights (none: from scratch); publish to ``publish_to`` (default the registry's
    starter path) and return that file. ``seed``: MONAI's determinism for the run (None: left as is)."""
    from monai.utils import set_determinism

    from lib.trainers.segmentation import SuPreMTrainer

    epochs = max(1, math.ceil(steps / max(len(datastore.datalist()), 1)))
    trainer = SuPreMTrainer(
        BACKBONE, registry, labels, recipe,
        model_dir=os.path.join(work_dir, "model"), split_file=os.path.join(work_dir, "split.json"),
        max_epochs=epochs, num_samples=crops_per_step, lr=lr, val_fraction=0.0, amp="none",
        publish_to=publish_to or registry.starter_path(BACKBONE),
    )
    if seed is not None:
        set_determinism(seed=seed)
    try:
        request = {"name": "starter", "max_epochs": epochs, "num_samples": crops_per_step, "lr": lr,
                   "source": source, "device": device}
        return trainer(request, datastore)["published"]
    finally:
        if seed is not None:
            set_determinism(seed=None)
        shutil.rmtree(os.path.join(trainer.train_dir, "starter"), ignore_errors=True)
