"""Infer task: a SuPreM backbone (or the average of several) segmenting the app's organs."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any, Callable, Dict, Sequence

import torch
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from lib.classes import CLASS_INDEX
from lib.networks.inference import BackboneSet, NetworkCache, effective_amp, precision_name, synchronize, timed
from lib.transforms import ProbsToLabeld, Recipe, ResampleToInputd, inference_pre_transforms
from lib.weights import WeightsRegistry

logger = logging.getLogger(__name__)


_writer_warm = False


def warm_label_writer() -> None:
    """Load ITK's image modules now, once per process.

    MONAI Label's writer (ITK) loads them lazily at the first label it writes: 2.8-4.2 s on a 2-core CPU
    (2026-12-04), then 0.16-0.21 s a clinical-size label map. The server calls this while it starts, so
    its first infer request does not pay it. Not on a thread: ITK's lazy loading, run beside another
    thread's imports, broke them (``import ray`` in a scoring request could not find its vendored
    colorama).
    """
    global _writer_warm
    if _writer_warm:
        return
    import itk
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        itk.imwrite(itk.image_from_array(np.zeros((2, 2, 2), np.uint8)), os.path.join(folder, "w.nii.gz"), True)
    _writer_warm = True


class RecipeInferTask(BasicInferTask):
    """An infer task on the SuPreM recipe's working grid whose label map goes back to the input grid.

    Its result has ``stages``: the seconds of pre-processing, each backbone (or the attention's stages),
    the label map, the resampling to the input grid and the writing, so a user sees where the time goes.
    Tensors stay on the device they were computed on until the writer.
    """

    recipe: Recipe
    # The name of each post transform in the result's stages.
    POST_STAGES = {"ProbsToLabeld": "label_map", "ResampleToInputd": "resample"}

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        # The request's device (MONAI Label resolves it, "cuda" by default when there is one): on a GPU
        # the grid steps run there.
        return inference_pre_transforms(self.recipe, device=(data or {}).get("device"))

    def run_pre_transforms(self, data, transforms):
        # MONAI's Spacingd updates every "image_*" key as a meta dict; "image_path" is a string.
        start = time.perf_counter()
        path = data.pop("image_path", None)
        data = super().run_pre_transforms(data, transforms)
        if path is not None:
            data["image_path"] = path
        data["stage_seconds"] = {"pre": round(time.perf_counter() - start, 3)}
        return data

    def run_post_transforms(self, data, transforms):
        stages = data.setdefault("stage_seconds", {})
        for t in transforms:
            name = self.POST_STAGES.get(type(t).__name__, type(t).__name__)
            with timed(stages, name, data.get("device") or "cpu"):
                data = super().run_post_transforms(data, [t])
        return data

    def inverse_transforms(self, data=None):
        return None  # ResampleToInputd undoes the geometry in one step

    def writer(self, data: Dict[str, Any], extension=None, dtype=None):
        ext = data.get("result_extension") or ".nii.gz"
        start = time.perf_counter()
        out, result = super().writer(data, extension=ext, dtype="uint8")  # the label map goes to the host here
        result = dict(result or {})
        result["stages"] = {**data.get("stage_seconds", {}), "write": round(time.perf_counter() - start, 3)}
        return out, result


class SuPreMSegmentation(RecipeInferTask):
    """Segment the app's organs with one backbone, or average the sigmoid probabilities of several.

    The label map comes back on the input's own grid, valued by SuPreM class index (0 = background).
    """

    def __init__(
        self,
        backbones: Sequence[str],
        registry: WeightsRegistry,
        labels: Sequence[str],
        recipe: Recipe,
        cache: NetworkCache,
        description: str = "",
    ):
        self.backbones = BackboneSet(backbones, registry, labels, cache)
        self.registry = registry
        self.recipe = recipe
        self.label_names = list(labels)
        super().__init__(
            path=None,
            network=None,
            type=InferType.SEGMENTATION,
            labels={n: CLASS_INDEX[n] for n in self.label_names},
            dimension=3,
            description=description or f"SuPreM {' + '.join(self.backbones.names)}",
            config={"overlap": recipe.overlap, "sw_batch_size": recipe.sw_batch_size, "amp": recipe.amp},
        )

    # --- what MONAI Label asks of an infer task -------------------------------------------------------
    def is_valid(self) -> bool:
        return bool(self.backbones.active())

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info["backbones"] = self.backbones.active()
        info["weights"] = {b: self.registry.info(b) for b in self.backbones.names}
        info["recipe"] = self.recipe.as_dict()
        # What each backbone really runs in on this machine (bf16 asked on a CPU without bf16 kernels: fp32).
        device = "cuda" if torch.cuda.is_available() else "cpu"  # MONAI Label's default request device
        info["precision"] = {b: precision_name(effective_amp(device, self.recipe.amp)) for b in self.backbones.names}
        return info

    def why_unavailable(self) -> str:
        return self.backbones.why_unavailable()

    def request_recipe(self, data: Dict) -> Recipe:
        """The recipe with the per-request overrides a client may send (overlap, sw_batch_size, amp)."""
        kw = {}
        if data.get("overlap") is not None:
            kw["overlap"] = float(data["overlap"])
        if data.get("sw_batch_size") is not None:
            kw["sw_batch_size"] = int(data["sw_batch_size"])
        if data.get("amp") is not None:
            kw["amp"] = str(data["amp"])
        return self.recipe.with_overrides(**kw)

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return [
            ProbsToLabeld(keys="pred", class_indices=[CLASS_INDEX[n] for n in self.label_names]),
            ResampleToInputd(keys="pred", ref_key="image"),
        ]

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cuda"):
        data["pred"] = self.probabilities(data["image"], data, device)
        return data

    def writer(self, data: Dict[str, Any], extension=None, dtype=None):
        out, result = super().writer(data, extension, dtype)
        result["models"] = {b: self.registry.info(b) for b in data.get("backbones_used", [])}
        return out, result

    # --- the model part -------------------------------------------------------------------------------
    def probabilities(self, image: torch.Tensor, data: Dict, device) -> MetaTensor:
        """Mean sigmoid probability (C, X, Y, Z) over the loaded backbones, on the working grid."""
        recipe = self.request_recipe(data)
        total, used = None, []  # a running sum: one probability volume in memory besides the current one
        stages = data.setdefault("stage_seconds", {})
        start = time.perf_counter()
        for backbone, probs in self.backbones.probabilities(image, recipe, torch.device(device)):
            total = probs if total is None else total + probs
            synchronize(device)  # the backbone's GPU work is done: its time is its own
            stages[backbone] = round(time.perf_counter() - start, 3)
            used.append(backbone)
            start = time.perf_counter()
        data["backbones_used"] = used
        mean = total / len(used)
        return MetaTensor(mean, affine=image.affine, meta=dict(image.meta)) if isinstance(image, MetaTensor) else mean
