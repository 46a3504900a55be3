"""The three SuPreM networks, built so that their state dicts match the released checkpoints.

``build_network(backbone)`` returns a module mapping (B, 1, D, H, W) CT intensities scaled to 0..1
to (B, C, D, H, W) logits (one sigmoid channel per class, released order). Its ``state_dict()``
keys, each prefixed with ``module.``, are exactly those of the released ``net`` dicts, so
``load_checkpoint`` reads the released ``.pth`` files and ``save_checkpoint`` writes the same format.
"""

from __future__ import annotations

from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, state_dict_in_released_format

BACKBONES = ("unet", "swinunetr", "segresnet")

__all__ = [
    "BACKBONES",
    "CheckpointError",
    "build_network",
    "load_checkpoint",
    "save_checkpoint",
    "state_dict_in_released_format",
    "validate_checkpoint",
]


def build_network(backbone: str, out_channels: int = 32) -> nn.Module:
    """A randomly initialised SuPreM network in the released layout.

    Args:
        backbone: one of ``BACKBONES``: ``"unet"`` (U-Net + universal head; D, H, W divisible by
            8), ``"swinunetr"`` (Swin UNETR + universal head; divisible by 32) or ``"segresnet"``
            (MONAI SegResNet; divisible by 8).
        out_channels: number of output classes C; 32 for the released weights.

    Returns:
        A module taking (B, 1, D, H, W) float intensities in 0..1 and returning (B, C, D, H, W)
        logits. The U-Net's batch norm always uses the statistics of the batch it is given, as in
        the released model, so its output for a sample depends on the rest of its batch.

    Raises:
        ValueError: unknown backbone (the message lists the choices) or out_channels < 1.
    """
    if out_channels < 1:
        raise ValueError(f"out_channels must be >= 1, got {out_channels}")
    # Imported here so that loading checkpoints or building the U-Net does not import MONAI.
    if backbone == "unet":
        from .universal import UniversalModel
        from .unet import UNet3D

        return UniversalModel(UNet3D(), out_channels)
    if backbone == "swinunetr":
        from .swinunetr import SwinUNETRBackbone
        from .universal import UniversalModel

        return UniversalModel(SwinUNETRBackbone(), out_channels)
    if backbone == "segresnet":
        from .segresnet import build_segresnet

        return build_segresnet(out_channels)
    raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")


def validate_checkpoint(backbone: str, path: str) -> None:
    """Raise CheckpointError unless ``path`` holds every key of ``backbone`` with the right shapes (and
    nothing else); what the weights registry checks each file with before serving it."""
    load_checkpoint(build_network(backbone), path)
