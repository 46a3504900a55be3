"""Infer task ``attention``: where the annotator should look, as a label image over the CT."""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence

import torch
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType

from lib.infers.segmentation import RecipeInferTask
from lib.importance.scorer import VolumeScorer
from lib.importance.attention import LABEL_NAMES, LABEL_NONE, attention_labels
from lib.transforms import ResampleToInputd


class AttentionInfer(RecipeInferTask):
    """Label image of the AbdomenAtlas-8K attention: 1 uncertain, 2 inconsistent, 3 overlapping organs.

    Params: ``organ`` (a name or a list) restricts the map to those organs. The result JSON carries the
    volume's score and its organs in revision order.
    """

    def __init__(self, scorer: VolumeScorer):
        self.scorer = scorer
        self.recipe = scorer.recipe
        super().__init__(
            path=None,
            network=None,
            type=InferType.SEGMENTATION,
            labels={name: value for value, name in LABEL_NAMES.items() if value != LABEL_NONE},
            dimension=3,
            description="Where to look: uncertain, inconsistent and overlapping organ regions (importance attention)",
        )

    def is_valid(self) -> bool:
        return bool(self.scorer.active())

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info["backbones"] = self.scorer.active()
        return info

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return [ResampleToInputd(keys="pred", ref_key="image")]

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cuda"):
        image = data["image"]
        versions = self.scorer.versions()
        result = self.scorer.attention(image, data.setdefault("stage_seconds", {}))
        label = attention_labels(result, data.get("organ") or None)[None].to(torch.uint8)
        data["pred"] = MetaTensor(label, affine=image.affine, meta=dict(image.meta))
        record = self.scorer.record(result, versions, 0.0)
        data.setdefault("result", {}).update({k: record[k] for k in ("score", "organs", "attention_ml", "models")})
        return data
