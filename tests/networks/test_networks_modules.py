"""The pieces whose behaviour differs from stock layers: legacy patch merging, batch-statistics
batch norm, and the vectorised universal head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib.networks import universal
from lib.networks.unet import ContBatchNorm3d
from lib.networks.universal import UniversalModel


def test_legacy_patch_merging_concatenates_subgrids_in_released_order():
    from lib.networks.swinunetr import LegacyPatchMerging

    merge = LegacyPatchMerging(dim=1)
    merge.norm = nn.Identity()
    merge.reduction = nn.Identity()
    d = h = w = 4
    grid = torch.arange(d * h * w, dtype=torch.float32).reshape(1, d, h, w, 1)
    out = merge(grid)
    released_order = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)]
    assert out.shape == (1, 2, 2, 2, 8)
    for channel, (i, j, k) in enumerate(released_order):
        assert torch.equal(out[..., channel], grid[:, i::2, j::2, k::2, 0]), (channel, (i, j, k))


def test_swin_unetr_uses_legacy_patch_merging_in_every_stage():
    from lib.networks import build_network
    from lib.networks.swinunetr import LegacyPatchMerging

    swin = build_network("swinunetr").backbone.swinViT
    for stage in (swin.layers1, swin.layers2, swin.layers3, swin.layers4):
        assert type(stage[0].downsample) is LegacyPatchMerging


def test_cont_batch_norm_uses_batch_statistics_in_eval_mode_and_leaves_running_stats():
    """Eval: each sample with its own statistics (what it gets in a batch of one, as the recipe slides
    its windows), never the running ones. Training: the statistics of the whole batch."""
    torch.manual_seed(0)
    bn = ContBatchNorm3d(3)
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    x = torch.randn(2, 3, 4, 4, 4) * 2 + 1
    x[1] = x[1] * 3 - 4  # the two samples' statistics differ
    bn.eval()
    y = bn(x)
    alone = torch.cat([F.batch_norm(x[i : i + 1], None, None, bn.weight, bn.bias, True, 0.0, bn.eps) for i in range(2)])
    joint = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    assert torch.allclose(y, alone, atol=1e-5)
    assert torch.allclose(bn(x[1:]), alone[1:], atol=1e-5)
    assert not torch.allclose(y, joint, atol=1e-2)
    assert torch.all(bn.running_mean == 5.0) and torch.all(bn.running_var == 9.0)
    bn.train()
    assert torch.allclose(bn(x), joint, atol=1e-5)
    assert not torch.all(bn.running_mean == 5.0)  # training still tracks statistics


def test_released_unet_gives_a_window_the_same_logits_alone_and_in_a_batch():
    """sw_batch_size changes the speed, not the segmentation (the `fast` preset batches 16 windows)."""
    from lib.networks import build_network

    torch.manual_seed(0)
    net = build_network("unet").eval()
    windows = torch.rand(2, 1, 32, 32, 32)
    windows[1] = windows[1] * 0.3 + 0.5  # another part of the body: other statistics
    with torch.no_grad():
        batched = net(windows)
        alone = torch.cat([net(windows[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


class _FixedFeatures(nn.Module):
    """A stand-in backbone returning given (bottleneck, decoded) features."""

    bottleneck_channels = 32
    decoder_channels = 16

    def __init__(self, bottleneck: torch.Tensor, decoded: torch.Tensor) -> None:
        super().__init__()
        self.bottleneck = nn.Parameter(bottleneck)
        self.decoded = nn.Parameter(decoded)

    def forward(self, x):
        return self.bottleneck * x.mean(), self.decoded * x.mean()


def _reference_head(model: UniversalModel, bottleneck, decoded):
    """The universal head as described in the SuPreM facts: per sample, per-class parameters from
    the controller, the head features repeated per class, three grouped 1x1x1 convolutions."""
    c = model.out_channels
    task = F.relu(model.text_to_vision(model.organ_embedding))[:, :, None, None, None]
    image = model.GAP(bottleneck)
    head = model.precls_conv(decoded)
    outputs = []
    for i in range(bottleneck.shape[0]):
        params = model.controller(torch.cat([image[i : i + 1].repeat(c, 1, 1, 1, 1), task], 1)).flatten(1)
        w1, w2, w3, b1, b2, b3 = torch.split(params, [64, 64, 8, 8, 8, 1], dim=1)
        x = head[i : i + 1].repeat(c, 1, 1, 1, 1)
        _, _, d, h, w = x.shape
        x = x.reshape(1, c * 8, d, h, w)
        x = F.relu(F.conv3d(x, w1.reshape(c * 8, 8, 1, 1, 1), b1.reshape(-1), groups=c))
        x = F.relu(F.conv3d(x, w2.reshape(c * 8, 8, 1, 1, 1), b2.reshape(-1), groups=c))
        x = F.conv3d(x, w3.reshape(c, 8, 1, 1, 1), b3.reshape(-1), groups=c)
        outputs.append(x.reshape(1, c, d, h, w))
    return torch.cat(outputs)


@pytest.mark.parametrize("chunk_voxels", [7, 10_000])
def test_universal_head_equals_per_sample_grouped_conv_reference_with_gradients(monkeypatch, chunk_voxels):
    # Steps of 7 voxels cut the 5x6x7 volume at uneven places; 10000 voxels take it whole.
    monkeypatch.setattr(universal, "_CHUNK_ELEMENTS_CPU", chunk_voxels * 2 * 5 * universal.HEAD_CHANNELS)
    torch.manual_seed(0)
    backbone = _FixedFeatures(torch.randn(2, 32, 2, 2, 2), torch.randn(2, 16, 5, 6, 7))
    model = UniversalModel(backbone, out_channels=5)
    with torch.no_grad():
        model.organ_embedding.normal_()
    x = torch.ones(1)

    ours = model(x)
    grads = torch.autograd.grad(ours.square().sum(), list(model.parameters()))
    bottleneck, decoded = backbone(x)
    ref = _reference_head(model, bottleneck, decoded)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))

    assert ours.shape == (2, 5, 5, 6, 7)
    assert torch.allclose(ours, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-4)


def test_universal_head_takes_monai_metatensors_as_training_batches_are():
    # MONAI's data loader gives MetaTensors; MetaTensor.new_empty takes no varargs size (fine-tuning the U-Net
    # and Swin UNETR failed on a GPU machine with "argument 'size' must be tuple of ints").
    from monai.data import MetaTensor

    torch.manual_seed(0)
    features = (MetaTensor(torch.randn(2, 32, 2, 2, 2)), MetaTensor(torch.randn(2, 16, 3, 4, 5)))
    model = UniversalModel(_FixedFeatures(*features), out_channels=5)
    out = model(torch.ones(1))
    assert out.shape == (2, 5, 3, 4, 5)
    plain = UniversalModel(_FixedFeatures(*(torch.as_tensor(f) for f in features)), out_channels=5)
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(torch.as_tensor(out), plain(torch.ones(1)), atol=1e-6)
