"""A published fine-tuned model is checked like a released one before it is served."""

from __future__ import annotations

import logging
import os

import torch

from lib.networks import validate_checkpoint
from testing.synthetic_weights import synthetic_released_state_dict
from lib.weights import RELEASED_FILES, WeightsRegistry
from support import write_synthetic_checkpoint


def _registry(tmp_path):
    weights = tmp_path / "weights"
    (tmp_path / "model").mkdir()
    write_synthetic_checkpoint("segresnet", str(weights / RELEASED_FILES["segresnet"]))
    reg = WeightsRegistry(
        str(tmp_path / "model"), validate_checkpoint, weights_dir=str(weights), use_pretrained_model=False
    )
    reg.resolve("segresnet")
    return reg, str(weights / RELEASED_FILES["segresnet"])


def test_a_published_file_that_does_not_fit_is_refused_and_the_released_weights_are_served(tmp_path, caplog):
    reg, released = _registry(tmp_path)
    published = reg.published_path("segresnet")
    torch.save({"net": synthetic_released_state_dict("unet")}, published)  # another architecture
    with caplog.at_level(logging.ERROR, logger="lib.weights.registry"):
        assert reg.current_path("segresnet") == released
        assert reg.current_path("segresnet") == released
    refusals = [r for r in caplog.records if "published model refused" in r.getMessage()]
    assert len(refusals) == 1, "one log line per file, not one per request"
    info = reg.info("segresnet")
    assert info["source"] == "released" and "segresnet_finetuned.pth" in info["problem"]
    # A good file published over it (as a round does, by rename) is taken at once.
    write_synthetic_checkpoint("segresnet", published + ".new", seed=4)
    os.replace(published + ".new", published)
    assert reg.current_path("segresnet") == published
    assert reg.info("segresnet")["source"] == "fine-tuned" and "problem" not in reg.info("segresnet")
