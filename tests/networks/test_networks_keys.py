"""The networks' state dicts are exactly the released checkpoints' (names, shapes, order)."""

from __future__ import annotations

import pytest
import torch

from lib.networks import BACKBONES, build_network, state_dict_in_released_format
from testing.synthetic_weights import synthetic_released_state_dict


@pytest.fixture(scope="module")
def networks():
    return {backbone: build_network(backbone) for backbone in BACKBONES}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_state_dict_keys_and_shapes_equal_released_tsv_in_order(networks, released_keys, backbone):
    mine = [(k, tuple(v.shape)) for k, v in state_dict_in_released_format(networks[backbone]).items()]
    assert mine == released_keys(backbone)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_synthetic_state_dict_walks_released_keys_in_order(networks, released_keys, backbone):
    synthetic = synthetic_released_state_dict(backbone, model=networks[backbone])
    assert [(k, tuple(v.shape)) for k, v in synthetic.items()] == released_keys(backbone)
    for key, value in synthetic.items():
        expected = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        assert value.dtype == expected, key


def test_synthetic_state_dict_is_deterministic_per_seed_and_builds_its_own_model():
    a = synthetic_released_state_dict("segresnet", seed=3)
    b = synthetic_released_state_dict("segresnet", seed=3)
    c = synthetic_released_state_dict("segresnet", seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["module.convInit.conv.weight"], c["module.convInit.conv.weight"])


def test_unknown_backbone_raises_value_error_listing_the_choices():
    with pytest.raises(ValueError) as err:
        build_network("vnet")
    for name in ("vnet", *BACKBONES):
        assert name in str(err.value)


def test_out_channels_resizes_organ_embedding_and_output_layer():
    assert build_network("unet", out_channels=5).organ_embedding.shape == (5, 512)
    assert build_network("swinunetr", out_channels=3).organ_embedding.shape == (3, 512)
    assert build_network("segresnet", out_channels=7).conv_final[2].conv.weight.shape == (7, 16, 1, 1, 1)
    with pytest.raises(ValueError):
        build_network("unet", out_channels=0)


@pytest.mark.parametrize(
    "backbone,spatial",
    # Swin UNETR needs sizes divisible by 32 and more than one voxel at 1/32 scale (instance norm).
    [("unet", (16, 16, 24)), ("swinunetr", (64, 32, 32)), ("segresnet", (16, 16, 24))],
)
def test_forward_maps_batch_of_volumes_to_logits_of_the_same_size(backbone, spatial):
    batch = 1 if backbone == "swinunetr" else 2  # keep the slow one cheap; batching is generic
    model = build_network(backbone, out_channels=4).eval()
    x = torch.rand(batch, 1, *spatial)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (batch, 4, *spatial)
    assert torch.isfinite(y).all()
