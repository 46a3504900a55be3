"""Released-format synthetic weights reproduce the SuPreM reference logits (golden vectors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lib.networks import BACKBONES, build_network, load_checkpoint
from testing.synthetic_weights import synthetic_released_state_dict


@pytest.mark.parametrize("backbone", BACKBONES)
def test_synthetic_released_checkpoint_reproduces_golden_logits(suprem_facts, tmp_path, backbone):
    golden = suprem_facts / "golden"
    model = build_network(backbone)
    path = tmp_path / f"supervised_suprem_{backbone}_synthetic.pth"
    torch.save({"net": synthetic_released_state_dict(backbone, seed=0, model=model)}, path)

    load_checkpoint(model, path).eval()
    x = torch.from_numpy(np.load(golden / "input_seed0_64.npy"))
    assert x.shape == (1, 1, 64, 64, 64)
    with torch.no_grad():
        y = model(x)

    expected = np.load(golden / f"{backbone}_seed0_64_logits_every4.npy")
    got = y[:, :, ::4, ::4, ::4].numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-3
    summary = json.loads((golden / "summary_seed0_64.json").read_text())[backbone]
    assert list(y.shape) == summary["shape"]
    assert y.mean().item() == pytest.approx(summary["mean"], abs=1e-4)
    assert y.std().item() == pytest.approx(summary["std"], abs=1e-4)
