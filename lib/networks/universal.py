"""SuPreM's universal head: one dynamic 3-layer 1x1x1 convolution per class, conditioned on text.

A backbone returns ``(bottleneck, decoded)``. For every sample and class the head builds the
weights of a tiny per-class network (8 -> 8 -> 8 -> 1 channels) from the global image feature and
that class's CLIP text embedding, and runs it on the decoded features. Parameter and buffer names
(``organ_embedding``, ``precls_conv``, ``GAP``, ``controller``, ``text_to_vision``) follow the
released checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_CHANNELS = 8  # width of the per-class dynamic network
TASK_CHANNELS = 256  # width of the image and text codes fed to the controller
TEXT_CHANNELS = 512  # CLIP text embedding width
# Per class the controller emits, in this order: weights 8x8, 8x8, 1x8, then biases 8, 8, 1.
WEIGHT_NUMS = (HEAD_CHANNELS * HEAD_CHANNELS, HEAD_CHANNELS * HEAD_CHANNELS, HEAD_CHANNELS)
BIAS_NUMS = (HEAD_CHANNELS, HEAD_CHANNELS, 1)
NUM_DYNAMIC_PARAMS = sum(WEIGHT_NUMS) + sum(BIAS_NUMS)  # 153
# Size (elements) of the per-step intermediates of the dynamic heads. On CPU, steps of about 8 MiB
# ran 3-4x faster than whole-volume steps (cache); on GPU, 256 MiB steps keep the device busy
# without the ~1 GiB intermediates a whole 96^3 volume with 32 classes would need.
_CHUNK_ELEMENTS_CPU = 2**21
_CHUNK_ELEMENTS_GPU = 2**26


class UniversalModel(nn.Module):
    """Backbone + universal head: (B, 1, D, H, W) intensities in 0..1 -> (B, C, D, H, W) logits.

    Args:
        backbone: a module whose forward returns ``(bottleneck, decoded)``; it must expose
            ``bottleneck_channels`` and ``decoder_channels``.
        out_channels: number of classes C (32 for the released weights). ``organ_embedding`` is a
            (C, 512) buffer of CLIP text embeddings; it is part of the checkpoint, so it is filled
            with zeros here and overwritten when weights are loaded.
    """

    def __init__(self, backbone: nn.Module, out_channels: int = 32) -> None:
        super().__init__()
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}")
        bottleneck = int(backbone.bottleneck_channels)
        decoded = int(backbone.decoder_channels)
        self.out_channels = out_channels
        self.backbone = backbone
        self.precls_conv = nn.Sequential(
            nn.GroupNorm(16, decoded),
            nn.ReLU(inplace=True),
            nn.Conv3d(decoded, HEAD_CHANNELS, kernel_size=1),
        )
        self.GAP = nn.Sequential(
            nn.GroupNorm(16, bottleneck),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool3d(1),
            nn.Conv3d(bottleneck, TASK_CHANNELS, kernel_size=1),
        )
        self.controller = nn.Conv3d(2 * TASK_CHANNELS, NUM_DYNAMIC_PARAMS, kernel_size=1)
        self.register_buffer("organ_embedding", torch.zeros(out_channels, TEXT_CHANNELS))
        self.text_to_vision = nn.Linear(TEXT_CHANNELS, TASK_CHANNELS)

    def dynamic_params(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """(B, C_bottleneck, d, h, w) features -> (B, C, 153) per-sample, per-class head parameters."""
        image_code = self.GAP(bottleneck).flatten(1)  # (B, 256)
        task_code = F.relu(self.text_to_vision(self.organ_embedding))  # (C, 256)
        b, c = image_code.shape[0], task_code.shape[0]
        cond = torch.cat(
            (image_code[:, None, :].expand(b, c, -1), task_code[None, :, :].expand(b, c, -1)), dim=2
        )
        # The controller is a 1x1x1 convolution on a 1x1x1 map, i.e. a linear layer.
        return F.linear(cond, self.controller.weight.flatten(1), self.controller.bias)

    def heads(self, feats: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Run every class's dynamic network on the head features.

        Args:
            feats: (B, 8, D, H, W) output of ``precls_conv``.
            params: (B, C, 153) from ``dynamic_params``.

        Returns:
            (B, C, D, H, W) logits.

        Each class's network is three 1x1x1 convolutions, so across classes they form grouped
        1x1x1 convolutions (groups = classes). They are computed here as batched matrix products
        over all samples and classes at once: the same arithmetic, but several times faster than
        ``conv3d(groups=C)`` on CPU. Layer 1 reads the same 8 features for every class, so it
        needs no per-class copy of the input. Voxels go through in chunks so the intermediates
        stay small instead of about 1 GiB per sample at 96^3 with 32 classes.
        """
        b, c, _ = params.shape
        k = HEAD_CHANNELS
        w1, w2, w3, b1, b2, b3 = torch.split(params, WEIGHT_NUMS + BIAS_NUMS, dim=2)
        # Within a class's block the weights are (out channel, in channel), row-major.
        w1 = w1.reshape(b, c * k, k)
        b1 = b1.reshape(b, c * k, 1)
        w2 = w2.reshape(b * c, k, k)
        b2 = b2.reshape(b * c, k, 1)
        w3 = w3.reshape(b * c, 1, k)
        b3 = b3.reshape(b * c, 1, 1)
        spatial = feats.shape[2:]
        x = feats.reshape(b, k, -1)
        n = x.shape[2]
        budget = _CHUNK_ELEMENTS_CPU if x.device.type == "cpu" else _CHUNK_ELEMENTS_GPU
        chunk = max(1, budget // (b * c * k))
        out = x.new_empty((b, c, n))  # a tuple: MONAI's MetaTensor.new_empty takes no varargs (training batches are MetaTensors)
        for start in range(0, n, chunk):
            y = torch.baddbmm(b1, w1, x[:, :, start : start + chunk]).relu_()
            y = torch.baddbmm(b2, w2, y.reshape(b * c, k, -1)).relu_()
            out[:, :, start : start + chunk] = torch.baddbmm(b3, w3, y).reshape(b, c, -1)
        return out.reshape(b, c, *spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) intensities in 0..1 -> (B, C, D, H, W) logits."""
        bottleneck, decoded = self.backbone(x)
        return self.heads(self.precls_conv(decoded), self.dynamic_params(bottleneck))
