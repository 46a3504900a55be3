"""Score one volume: every loaded backbone's probabilities -> attention maps -> score and organ priority.

The same code serves the server's scoring method, the attention infer task and the offline ranking.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from monai.transforms import Compose, ToDeviced

from lib.networks.inference import BackboneSet, NetworkCache, synchronize, timed
from lib.importance.attention import AttentionResult, compute_attention
from lib.importance.calibrated import BAND_MM, CALIBRATED_VERSION, OPENING_MM, compute_calibrated
from lib.transforms.labels import organ_masks
from lib.transforms.cache import open_cache
from lib.transforms.recipe import Recipe, inference_pre_transforms
from lib.weights.registry import WeightsSource

logger = logging.getLogger(__name__)

# Bump when the score or the organ order changes in a way the model files and options do not show, so
# stored records made the old way are scored again (2: each organ's heat by its own maximum, 2026-12-04).
SCORING_METHOD_VERSION = 2
# How a volume is ranked: the AbdomenAtlas-8K attention as the original computes it, or the calibrated
# expected Dice loss along the predicted borders (``lib.importance.calibrated``).
IMPORTANCE_MODES = ("reference", "calibrated")


class FixedWeights:
    """The registry interface VolumeScorer uses, over a fixed ``{backbone: model file}``."""

    def __init__(self, weights: Dict[str, str]):
        self.weights = dict(weights)

    def available(self, backbone: str) -> bool:
        return backbone in self.weights

    def current_path(self, backbone: str) -> Optional[str]:
        return self.weights.get(backbone)

    def info(self, backbone: str) -> Dict:
        path = self.weights.get(backbone)
        return {"backbone": backbone, "file": path} if path else {"backbone": backbone, "problem": "no model file given"}


@dataclass
class ScorerSpec:
    """A picklable description of a VolumeScorer: model files, labels, recipe and options."""

    backbones: List[str]
    weights: Dict[str, str]
    labels: List[str]
    recipe: Recipe
    entropy: str = "positive"
    normalise_score: bool = False
    cache_dir: Optional[str] = None
    mode: str = "reference"
    band_mm: float = BAND_MM
    opening_mm: float = OPENING_MM

    def build(self, device: Optional[str] = None) -> "VolumeScorer":
        return VolumeScorer(
            self.backbones,
            FixedWeights(self.weights),
            self.labels,
            self.recipe,
            device=device,
            entropy=self.entropy,
            normalise_score=self.normalise_score,
            cache_dir=self.cache_dir,
            mode=self.mode,
            band_mm=self.band_mm,
            opening_mm=self.opening_mm,
        )


class VolumeScorer:
    """Runs the loaded backbones on a volume and computes its AbdomenAtlas-8K attention.

    backbones: the backbones to use (those with weights are used); labels: the organ names scored;
    entropy / normalise_score: the options of ``compute_attention`` (defaults = the reference);
    mode: ``"reference"`` (that attention) or ``"calibrated"`` (``compute_calibrated`` with ``band_mm`` and
    ``opening_mm``, in mm on the recipe's grid; entropy and normalise_score do not apply there).
    """

    def __init__(
        self,
        backbones: Sequence[str],
        registry: WeightsSource,
        labels: Sequence[str],
        recipe: Recipe,
        cache: Optional[NetworkCache] = None,
        device: Optional[str] = None,
        entropy: str = "positive",
        normalise_score: bool = False,
        cache_dir: Optional[str] = None,
        mode: str = "reference",
        band_mm: float = BAND_MM,
        opening_mm: float = OPENING_MM,
    ):
        if mode not in IMPORTANCE_MODES:
            raise ValueError(f"importance mode {mode!r}: choose one of {', '.join(IMPORTANCE_MODES)}")
        self.backbones = BackboneSet(backbones, registry, labels, cache)
        self.registry = registry
        self.labels = list(labels)
        self.recipe = recipe
        self.cache = self.backbones.cache
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.entropy = entropy
        self.normalise_score = normalise_score
        self.mode = mode
        self.band_mm = float(band_mm)
        self.opening_mm = float(opening_mm)
        # On a GPU the grid steps run there; what goes to the disk cache comes back to the host first.
        self._pre = Compose(inference_pre_transforms(recipe, device=self.device))
        self._pre_for_cache = Compose(list(self._pre.transforms) + [ToDeviced("image", "cpu")])
        # Pre-processed volumes on disk, reused by the next round's re-scoring (None: off).
        self.cache_dir = cache_dir
        self._cache = open_cache(cache_dir, "score", recipe.preprocessing_key())

    def active(self) -> List[str]:
        return self.backbones.active()

    def versions(self) -> Dict[str, str]:
        """``{backbone: version}`` of the model files in use now: a score made with others is stale."""
        return self.backbones.versions()

    def preprocess(self, path: str):
        if self._cache is None:
            return self._pre({"image": path})["image"]
        return self._cache.dataset([{"image": path}], self._pre_for_cache)[0]["image"]

    def method(self) -> Dict:
        """How this scorer scores, beside its model files: a stored record made otherwise is not current."""
        method = {"version": SCORING_METHOD_VERSION, "entropy": self.entropy, "normalise_score": self.normalise_score}
        if self.mode != "reference":  # the reference's records stay as they were: no re-scoring of a pool for it
            method.update(
                {"mode": self.mode, "calibrated": CALIBRATED_VERSION, "band_mm": self.band_mm, "opening_mm": self.opening_mm}
            )
        return method

    def spec(self) -> "ScorerSpec":
        """What another process needs to build this scorer with the model files in use now."""
        return ScorerSpec(
            backbones=self.active(),
            weights={b: self.registry.current_path(b) for b in self.active()},
            labels=self.labels,
            recipe=self.recipe,
            entropy=self.entropy,
            normalise_score=self.normalise_score,
            cache_dir=self.cache_dir,
            mode=self.mode,
            band_mm=self.band_mm,
            opening_mm=self.opening_mm,
        )

    def probabilities(self, image, stages: Optional[Dict[str, float]] = None) -> torch.Tensor:
        """(M, C, X, Y, Z) sigmoid probabilities of the active backbones on the working grid, on the device.

        ``stages``: a dict that gets each backbone's seconds.
        """
        volumes = []
        start = time.perf_counter()
        for backbone, probs in self.backbones.probabilities(image, self.recipe, self.device):
            synchronize(self.device)  # the backbone's GPU work is done: its time is its own
            if stages is not None:
                stages[backbone] = round(time.perf_counter() - start, 3)
            volumes.append(probs)
            start = time.perf_counter()
        return torch.stack(volumes)

    def attention(self, image, stages: Optional[Dict[str, float]] = None) -> AttentionResult:
        """The attention of a pre-processed image; ``stages`` gets the seconds of each backbone, of the
        organ masks and of the attention maps. Everything stays on the scorer's device."""
        stages = {} if stages is None else stages
        probs = self.probabilities(image, stages)
        with timed(stages, "masks", self.device):
            masks = organ_masks(probs.mean(0), self.recipe.threshold)
        with timed(stages, "attention", self.device):
            if self.mode == "calibrated":
                result = compute_calibrated(
                    probs, masks, self.labels, self.recipe.spacing, band_mm=self.band_mm, opening_mm=self.opening_mm
                )
            else:
                result = compute_attention(
                    probs, masks, self.labels, entropy=self.entropy, normalise_score=self.normalise_score
                )
        return result

    def score_file(self, path: str) -> Tuple[Dict, AttentionResult]:
        """Score one image file; returns the record stored per image, and the full result."""
        start = time.perf_counter()
        image = self.preprocess(path)
        return self.score_image(image, time.perf_counter() - start)

    def score_image(self, image, pre_seconds: float = 0.0) -> Tuple[Dict, AttentionResult]:
        """Score a pre-processed image (``preprocess``; it took ``pre_seconds``): the record and the result.

        The record's ``stages`` are the seconds of pre-processing, each backbone, the organ masks and the
        attention; ``seconds`` is the volume's whole time (its pre-processing may have run meanwhile on
        another thread, while the previous volume was scored).
        """
        start = time.perf_counter()
        versions = self.versions()
        stages = {"pre": round(pre_seconds, 3)}
        result = self.attention(image, stages)
        return self.record(result, versions, pre_seconds + time.perf_counter() - start, stages), result

    def record(
        self, result: AttentionResult, versions: Dict[str, str], seconds: float, stages: Optional[Dict] = None
    ) -> Dict:
        voxel_ml = math.prod(self.recipe.spacing) / 1000.0
        return {
            "score": float(result.score) if result.normalised else int(result.score),
            # Organs to revise, most important first (those without any attention left out).
            "organs": [o for o in result.priority if result.heat_sums.get(o, 0) > 0],
            "priority": list(result.priority),
            "attention_ml": {o: round(v * voxel_ml, 3) for o, v in result.attention_voxels.items() if v},
            "heat": {o: round(float(h), 3) for o, h in result.heat_sums.items() if h},  # calibrated: the gains
            "organ_scores": {o: round(float(v), 6) for o, v in result.organ_scores.items() if v},  # terms of score
            "models": versions,
            "method": self.method(),
            "entropy": result.entropy,
            "normalised": result.normalised,
            "seconds": round(seconds, 3),
            "stages": dict(stages or {}),
            "scored_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
