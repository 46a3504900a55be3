"""Input validation: refuse what is not a 3-D CT volume with a message that names the problem."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from monai.transforms import LoadImaged, MapTransform

logger = logging.getLogger(__name__)


class InputError(ValueError):
    """The input image is not something the models can segment (shape, intensities, file)."""


class CheckCTd(MapTransform):
    """Check a channel-first image is a single 3-D CT volume in Hounsfield units.

    Raises InputError for anything that is not one 3-D volume (2-D, 4-D, multi-channel, tiny).
    Intensities that do not look like HU (no air below -500 HU and nothing negative, as in MR or
    a normalised image) do not stop the request: a warning is logged and stored under
    ``data["result"]["warnings"]`` so the client sees it next to the label.
    """

    def __init__(self, keys, min_size: int = 8, result_key: str = "result"):
        super().__init__(keys)
        self.min_size = min_size
        self.result_key = result_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            shape = tuple(img.shape)
            spatial = shape[1:]
            if len(spatial) != 3 or shape[0] != 1 or min(spatial) < 2:
                raise InputError(
                    f"expected a single 3-D CT volume, got an image of shape {shape[1:] if shape[0] == 1 else shape}"
                    " (channels first); 2-D, 4-D and multi-channel images are not supported"
                )
            if max(spatial) < self.min_size:
                raise InputError(f"image of shape {spatial} is too small to be a CT volume")
            arr = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
            lo, hi = float(arr.min()), float(arr.max())
            if not np.isfinite([lo, hi]).all():
                raise InputError("image holds NaN or infinite values")
            if lo > -500.0 or hi - lo < 200.0:
                msg = (
                    f"intensities {lo:.0f}..{hi:.0f} do not look like CT in Hounsfield units "
                    "(no air below -500 HU); the result is unlikely to be meaningful"
                )
                logger.warning(msg)
                d.setdefault(self.result_key, {}).setdefault("warnings", []).append(msg)
        return d


class WarnIfSmallerThand(MapTransform):
    """Log a warning (once per image) when an image's working grid is smaller than ``size`` (the training
    window) in some axis: the window then holds padding around it, which the model learns as part of
    the scene."""

    def __init__(self, keys, size, what: str = "training window"):
        super().__init__(keys)
        self.size = tuple(int(s) for s in size)
        self.what = what
        self.warned = set()

    def __call__(self, data):
        for key in self.key_iterator(data):
            shape = tuple(int(s) for s in data[key].shape[1:])
            short = [axis for axis, (have, want) in enumerate(zip(shape, self.size)) if have < want]
            if short:
                name = os.path.basename(str(getattr(data[key], "meta", {}).get("filename_or_obj", "") or "image"))
                if name in self.warned:
                    continue
                self.warned.add(name)
                logger.warning(
                    f"{name}: working grid {shape} is smaller than the {self.what} {self.size} in axis "
                    f"{', '.join(map(str, short))}; the model trains on padding there"
                )
        return data


class LoadCTd(LoadImaged):
    """MONAI's LoadImaged, with an unreadable file reported as an InputError that names the file."""

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except Exception as e:  # any reader failure: corrupt, truncated, unknown format
            names = [os.path.basename(str(data.get(k))) for k in self.keys if k in data]
            reason = str(e).split("\n")[0].replace(str(data.get(self.keys[0], "")), names[0] if names else "")
            raise InputError(f"could not read image file {', '.join(names)}: {reason[:300]}") from e
