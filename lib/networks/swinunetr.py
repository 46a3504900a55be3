"""SuPreM's Swin UNETR backbone: MONAI's SwinUNETR (feature_size 48) without its output layer,
with the patch merging of MONAI 0.9 that the released weights were trained with."""

from __future__ import annotations

from typing import Tuple

import torch
from monai.networks.nets.swin_unetr import PatchMerging, SwinUNETR


class LegacyPatchMerging(PatchMerging):
    """Patch merging with the sub-grid order of MONAI 0.9, which the released weights expect.

    Merging concatenates the 2x2x2 neighbours of each voxel along channels before ``norm`` and
    ``reduction``. MONAI 0.9 took the (d, h, w) offsets in the order (0,0,0), (1,0,0), (0,1,0),
    (0,0,1), (1,0,1), (0,1,0), (0,0,1), (1,1,1): (0,1,0) and (0,0,1) appear twice and (1,1,0),
    (0,1,1) never. Later MONAI versions changed ``PatchMerging`` to take all eight offsets once
    (and ``PatchMergingV2`` uses yet another order); with either, the released ``reduction``
    weights multiply the wrong features and the outputs change. Parameters are unchanged.
    """

    _OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W, C) channels-last tokens -> (B, ceil(D/2), ceil(H/2), ceil(W/2), 2C)."""
        if x.dim() != 5:
            # Only the 3-D layout differs from MONAI; anything else is its business.
            return super().forward(x)
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = torch.nn.functional.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in self._OFFSETS], dim=-1)
        return self.reduction(self.norm(x))


class SwinUNETRBackbone(SwinUNETR):
    """Swin UNETR feature extractor for the universal head.

    Input: (B, 1, D, H, W), each of D, H, W divisible by 32. Output: ``(bottleneck, decoded)`` with
    bottleneck (B, 768, D/32, H/32, W/32) and decoded (B, 48, D, H, W).
    """

    bottleneck_channels = 768
    decoder_channels = 48

    def __init__(self) -> None:
        super().__init__(in_channels=1, out_channels=32, feature_size=48, downsample=LegacyPatchMerging)
        # The released checkpoints have no `out` layer: the universal head replaces it.
        del self.out

    def forward(self, x_in: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            self._check_input_size(x_in.shape[2:])
        hidden = self.swinViT(x_in, self.normalize)
        enc0 = self.encoder1(x_in)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        bottleneck = self.encoder10(hidden[4])
        dec3 = self.decoder5(bottleneck, hidden[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return bottleneck, self.decoder1(dec0, enc0)
