"""SuPreM's released SegResNet: MONAI's SegResNet with the released arguments, no universal head."""

from __future__ import annotations

from monai.networks.nets import SegResNet


def build_segresnet(out_channels: int = 32) -> SegResNet:
    """MONAI ``SegResNet`` as released by SuPreM (4.70M parameters with 32 outputs).

    Input: (B, 1, D, H, W) intensities in 0..1, D, H, W divisible by 8. Output: (B, out_channels,
    D, H, W) logits (sigmoid per channel). Fine-tuning replaces ``conv_final.2.conv``.
    """
    return SegResNet(
        spatial_dims=3,
        blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1),
        init_filters=16,
        in_channels=1,
        out_channels=out_channels,
        dropout_prob=0.0,
    )
