"""The importance engine built from the app's config (``lib.config.parse_conf``): the server and the
offline ranking make their weights registry, scorer and engine here, from one parse of one set of keys,
so a folder ranked offline is ranked as the server ranks it."""

from __future__ import annotations

from typing import Optional

from lib.config import AppConfig
from lib.importance.engines import make_engine
from lib.importance.scorer import VolumeScorer
from lib.networks import validate_checkpoint
from lib.networks.inference import NetworkCache
from lib.weights import WeightsRegistry


def weights_registry(cfg: AppConfig, model_dir: str) -> WeightsRegistry:
    """The weights of each configured backbone, found (or downloaded when allowed) now."""
    registry = WeightsRegistry(
        model_dir,
        validate=validate_checkpoint,
        weights_dir=cfg.weights_dir,
        use_pretrained_model=cfg.use_pretrained_model,
        endpoint=cfg.hf_endpoint,
    )
    for b in cfg.models:
        registry.resolve(b)
    return registry


def volume_scorer(cfg: AppConfig, registry, cache: Optional[NetworkCache] = None, cache_dir: Optional[str] = None):
    """The per-volume importance step with the config's backbones, labels, recipe, entropy, score and
    importance mode (reference or calibrated, with its band and opening)."""
    return VolumeScorer(
        cfg.models,
        registry,
        cfg.labels,
        cfg.recipe,
        cache,
        device=cfg.device,
        entropy=cfg.entropy,
        normalise_score=cfg.normalise_score,
        cache_dir=cache_dir,
        mode=cfg.importance_mode,
        band_mm=cfg.band_mm,
        opening_mm=cfg.opening_mm,
    )


def scoring_engine(scorer: VolumeScorer, cfg: AppConfig, **ray_extra):
    """In-process, or Ray with the config's address, workers and GPUs per worker (``ray_extra``: e.g.
    ``retries``)."""
    if cfg.scoring_engine != "ray":
        return make_engine(scorer, "inprocess")
    return make_engine(
        scorer,
        "ray",
        address=cfg.ray_address,
        workers=cfg.ray_workers,
        gpus_per_worker=cfg.ray_gpus_per_worker,
        **ray_extra,
    )
