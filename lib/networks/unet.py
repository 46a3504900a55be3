"""Models-Genesis style 3D U-Net backbone, as used by SuPreM's released U-Net.

Parameter names (``down_tr64.ops.0.conv1.weight``, ...) follow the released checkpoint exactly, so
the module tree below must not be renamed or reordered.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


class ContBatchNorm3d(nn.modules.batchnorm._BatchNorm):
    """BatchNorm3d that always normalises with the statistics of the batch it is given.

    The released U-Net was trained and evaluated this way: its stored running statistics never
    enter the output, in ``eval()`` mode too. Reproducing the released logits therefore requires
    batch statistics at inference; using the running statistics gives a different network.

    In eval mode each sample of the batch is normalised with its own statistics: the recipe slides
    one window at a time, so a window batched with others (``sw_batch_size`` > 1) must get what it
    gets alone, or the batch size would change the segmentation and not only the speed.

    Running statistics are still updated in training mode (so checkpoints saved after fine-tuning
    carry the same kind of buffers as the released ones) but not in eval mode, where updating them
    would mutate the model on every inference call without changing any output.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected a 5-D input (B, C, D, H, W), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training:  # per sample: batch statistics of a batch of one
            return F.instance_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return F.batch_norm(
            input,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.weight,
            self.bias,
            True,  # batch statistics, always
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )


class LUConv(nn.Module):
    """Conv3d (kernel 3, padding 1) -> ContBatchNorm3d -> ReLU; spatial size unchanged."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = ContBatchNorm3d(out_channels)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


def _two_convs(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(LUConv(in_channels, mid_channels), LUConv(mid_channels, out_channels))


class DownTransition(nn.Module):
    """Two LUConv, then (except at the deepest level) MaxPool3d(2).

    ``forward`` returns ``(pooled, skip)``: the features passed down and the full-resolution
    features kept for the decoder (the same tensor at the deepest level).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, pool: bool) -> None:
        super().__init__()
        self.ops = _two_convs(in_channels, mid_channels, out_channels)
        self.maxpool = nn.MaxPool3d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return self.maxpool(skip), skip


class UpTransition(nn.Module):
    """ConvTranspose3d (kernel 2, stride 2), concatenate ``[upsampled, skip]``, two LUConv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = _two_convs(in_channels + skip_channels, out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


class UNet3D(nn.Module):
    """The SuPreM U-Net backbone (no output layer).

    Input: (B, 1, D, H, W) with D, H, W divisible by 8. Output: ``(bottleneck, decoded)`` with
    bottleneck (B, 512, D/8, H/8, W/8) and decoded (B, 64, D, H, W), the features the universal
    head consumes.
    """

    bottleneck_channels = 512
    decoder_channels = 64

    def __init__(self) -> None:
        super().__init__()
        self.down_tr64 = DownTransition(1, 32, 64, pool=True)
        self.down_tr128 = DownTransition(64, 64, 128, pool=True)
        self.down_tr256 = DownTransition(128, 128, 256, pool=True)
        self.down_tr512 = DownTransition(256, 256, 512, pool=False)
        self.up_tr256 = UpTransition(512, 256, 256)
        self.up_tr128 = UpTransition(256, 128, 128)
        self.up_tr64 = UpTransition(128, 64, 64)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x, skip64 = self.down_tr64(x)
        x, skip128 = self.down_tr128(x)
        x, skip256 = self.down_tr256(x)
        bottleneck, _ = self.down_tr512(x)
        x = self.up_tr256(bottleneck, skip256)
        x = self.up_tr128(x, skip128)
        x = self.up_tr64(x, skip64)
        return bottleneck, x
