"""Builds the app's tasks from its conf: the one table of models and labels drives everything."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.classes import label_dict
from lib.config import AppConfig, conf_summary, parse_conf
from lib.infers.attention import AttentionInfer
from lib.infers.predictor import NetworkCache
from lib.infers.segmentation import SuPreMSegmentation
from lib.networks import build_network, load_checkpoint
from lib.scoring.importance import ImportanceScoring
from lib.scoring.volume import VolumeScorer
from lib.strategies.importance import ImportanceStrategy
from lib.weights import WeightsRegistry

logger = logging.getLogger(__name__)


def validate_checkpoint(backbone: str, path: str) -> None:
    """Raise unless ``path`` holds every key of ``backbone`` with the right shapes (and nothing else)."""
    load_checkpoint(build_network(backbone), path)


@dataclass
class Tasks:
    cfg: AppConfig
    registry: WeightsRegistry
    cache: NetworkCache
    infers: Dict = field(default_factory=dict)
    trainers: Dict = field(default_factory=dict)
    strategies: Dict = field(default_factory=dict)
    scoring: Dict = field(default_factory=dict)
    scorer: Optional[VolumeScorer] = None

    @property
    def label_dict(self) -> Dict[str, int]:
        return label_dict(self.cfg.labels)

    def info(self) -> Dict:
        return {"suprem": {"conf": conf_summary(self.cfg), "weights": self.registry.summary()}}


def build_tasks(app_dir: str, studies: str, conf: Dict[str, str]) -> Tasks:
    cfg = parse_conf(conf)
    model_dir = cfg.model_dir or os.path.join(app_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    registry = WeightsRegistry(
        model_dir,
        validate=validate_checkpoint,
        weights_dir=cfg.weights_dir,
        use_pretrained_model=cfg.use_pretrained_model,
        endpoint=cfg.hf_endpoint,
    )
    for b in cfg.models:
        registry.resolve(b)
    cache = NetworkCache()
    tasks = Tasks(cfg=cfg, registry=registry, cache=cache)
    for b in cfg.models:
        tasks.infers[b] = SuPreMSegmentation([b], registry, cfg.labels, cfg.recipe, cache)
    tasks.infers["ensemble"] = SuPreMSegmentation(
        cfg.models, registry, cfg.labels, cfg.recipe, cache, description="Mean probability of the loaded SuPreM backbones"
    )
    scorer = VolumeScorer(
        cfg.models,
        registry,
        cfg.labels,
        cfg.recipe,
        cache,
        device=cfg.device,
        entropy=cfg.entropy,
        normalise_score=cfg.normalise_score,
    )
    tasks.scorer = scorer
    tasks.infers["attention"] = AttentionInfer(scorer)
    if not cfg.skip_scoring:
        tasks.scoring["importance"] = ImportanceScoring(scorer)
    if not cfg.skip_strategies:
        tasks.strategies.update(
            {"importance": ImportanceStrategy(hold_s=cfg.hold_s), "random": Random(), "first": First()}
        )
    for b in cfg.models:
        logger.info(f"Model {b}: {registry.info(b)}")
    return tasks
