"""The SuPreM pre-processing recipe as MONAI transforms, with the sliding-window settings beside it.

One ``Recipe`` holds every number of the recipe so that inference, scoring and training cannot drift
apart: RAS orientation, 1.5 mm isotropic spacing (bilinear), HU window -175..250 scaled to 0..1 and
clipped, foreground crop, 96^3 sliding window with overlap 0.75 and gaussian blending, sigmoid per
channel, threshold 0.5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch
from monai.transforms import (
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
    ToDeviced,
)

from .checks import CheckCTd, LoadCTd, WarnIfSmallerThand


# Mixed precision of a forward pass: the names users pass (conf, params, command line) and their dtypes.
AMP_MODES = ("none", "fp16", "bf16")
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Recipe:
    """Numbers of the SuPreM inference recipe.

    spacing: output voxel size in mm; a_min/a_max: HU window mapped to 0..1; roi: sliding window
    size in voxels; overlap: sliding-window overlap fraction; sw_batch_size: windows per forward
    pass; amp: "none", "fp16" or "bf16" autocast for the forward pass; threshold: sigmoid cut-off;
    tf32: TF32 float32 convolutions and matrix products on a GPU (True, False, None = torch's default);
    compile: run the networks through ``torch.compile`` (compiled once per process and model file);
    channels_last: the networks and their windows in channels-last memory order (``channels_last_3d``).
    None of the last four changes the label map beyond floating-point round-off.
    """

    spacing: Tuple[float, float, float] = (1.5, 1.5, 1.5)
    a_min: float = -175.0
    a_max: float = 250.0
    roi: Tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.75
    sw_batch_size: int = 1
    amp: str = "none"
    blend: str = "gaussian"
    threshold: float = 0.5
    tf32: Optional[bool] = None
    compile: bool = False
    channels_last: bool = False

    def __post_init__(self):
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}; got {self.amp!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1); got {self.overlap}")
        if self.sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1; got {self.sw_batch_size}")

    def with_overrides(self, **kw) -> "Recipe":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def as_dict(self) -> Dict:
        return asdict(self)

    def preprocessing_key(self) -> Dict:
        """The numbers that change the pre-processed image (for cache invalidation)."""
        return {"spacing": list(self.spacing), "a_min": self.a_min, "a_max": self.a_max}


# "recipe" is SuPreM's own setting; "fast" trades a little blending for speed on a GPU.
PRESETS: Dict[str, Recipe] = {
    "recipe": Recipe(),
    # sw_batch_size 16: fastest of 4 and 16 for all three networks on an H200 (issue 13).
    "fast": Recipe(overlap=0.5, sw_batch_size=16, amp="bf16"),
    # The offline demo's starter weights (scripts/prepare_sample.py): a coarse grid and a small window,
    # so a SegResNet trained for a few CPU minutes on phantoms segments them. Not for the released
    # SuPreM weights, which were trained on the recipe's 1.5 mm grid.
    # Four windows a forward pass: on a CPU PyTorch runs the 3-D convolutions of one window this small
    # with its own slow kernel, and of a batch with oneDNN (4x faster per window, bench/RESULTS.md).
    "demo": Recipe(spacing=(4.0, 4.0, 6.0), roi=(32, 24, 32), overlap=0.25, sw_batch_size=4),
}


def recipe_fit(trained: Dict, recipe: Recipe) -> Optional[str]:
    """Why weights trained with ``trained`` (a checkpoint sidecar's ``spacing`` and ``roi``) do not fit
    ``recipe``; None when they fit or the sidecar does not say."""
    spacing, roi = trained.get("spacing"), trained.get("roi")
    if spacing is None or roi is None:
        return None
    if [float(s) for s in spacing] == [float(s) for s in recipe.spacing] and [int(r) for r in roi] == list(recipe.roi):
        return None
    return (f"trained on a {'x'.join(f'{s:g}' for s in spacing)} mm grid with a {'x'.join(str(r) for r in roi)} window"
            f"{' (preset ' + trained['preset'] + ')' if trained.get('preset') else ''}, but the server runs "
            f"{'x'.join(f'{s:g}' for s in recipe.spacing)} mm with {'x'.join(str(r) for r in recipe.roi)}: "
            "its segmentations will be poor")


def inference_pre_transforms(recipe: Recipe, keys: str = "image", device=None) -> List:
    """Load an image file (NIfTI, NRRD, DICOM folder) and bring it onto the working grid.

    The output is a (1, X, Y, Z) float MetaTensor in 0..1 whose meta keeps ``original_affine`` and
    ``spatial_shape`` of the input, which ``ResampleToInputd`` uses to go back to the input grid.
    ``device``: where the grid steps run. A CUDA device gets the volume right after it is read and
    checked on the CPU, and reorients, resamples, windows and crops it there as tensor ops (the same
    MONAI transforms; the output differs from the CPU's only by interpolation round-off) and the
    output stays there; None or a CPU: all on the CPU.
    """
    on_gpu = device is not None and torch.device(device).type == "cuda"
    return [
        LoadCTd(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        CheckCTd(keys=keys),
        *([ToDeviced(keys=keys, device=torch.device(device))] if on_gpu else []),
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=recipe.spacing, mode="bilinear"),
        ScaleIntensityRanged(keys=keys, a_min=recipe.a_min, a_max=recipe.a_max, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key=keys, allow_smaller=True),
        EnsureTyped(keys=keys, dtype="float32"),
    ]


def labelled_pre_transforms(recipe: Recipe, label_map=None) -> List:
    """An image file and its label file onto the working grid: the inference recipe on both (the label
    resampled nearest, so its values stay class ids). ``label_map``: optional {source id: SuPreM index}
    for labels with other ids (e.g. TotalSegmentator)."""
    from monai.transforms import MapLabelValued

    keys = ("image", "label")
    t = [
        LoadImaged(keys=keys),
        EnsureChannelFirstd(keys=keys),
    ]
    if label_map:
        src = sorted(label_map)
        t.append(MapLabelValued(keys="label", orig_labels=src, target_labels=[label_map[s] for s in src]))
    return t + [
        Orientationd(keys=keys, axcodes="RAS"),
        Spacingd(keys=keys, pixdim=recipe.spacing, mode=("bilinear", "nearest")),
        ScaleIntensityRanged(keys="image", a_min=recipe.a_min, a_max=recipe.a_max, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
    ]


def training_transforms(
    recipe: Recipe,
    class_indices,
    roi,
    num_samples: int = 2,
    label_map=None,
    augment: bool = True,
) -> List:
    """Training pre-processing: the inference recipe on image and label, then the SuPreM crops/augments.

    ``label_map``: optional {source id: SuPreM index} for labels with other ids (e.g. TotalSegmentator).
    Crops: ``num_samples`` random ``roi`` crops, foreground:background 2:1, each of shape ``roi`` (so they
    batch). Output label: one binary channel per class in ``class_indices``.
    """
    from monai.transforms import RandCropByPosNegLabeld, RandRotate90d, RandShiftIntensityd, SpatialPadd

    from .labels import LabelToChannelsd

    keys = ("image", "label")
    t = labelled_pre_transforms(recipe, label_map) + [
        WarnIfSmallerThand(keys="image", size=roi),
        SpatialPadd(keys=keys, spatial_size=roi),
    ]
    if augment:
        crop = RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=roi, pos=2, neg=1, num_samples=num_samples, image_key="image"
        )
        rotate = RandRotate90d(keys=keys, prob=0.1, max_k=3)  # in the axial plane (spatial axes 0, 1)
        if roi[0] == roi[1]:
            t += [crop, rotate]  # the recipe's order
        else:
            # A quarter turn of a crop whose axial plane is not square changes its shape, and crops of
            # different shapes cannot be batched: turn the volume, pad it again, then crop.
            t += [rotate, SpatialPadd(keys=keys, spatial_size=roi), crop]
        t += [RandShiftIntensityd(keys="image", offsets=0.1, prob=0.2)]
    t += [LabelToChannelsd(keys="label", class_indices=class_indices), EnsureTyped(keys=keys, dtype="float32")]
    return t
