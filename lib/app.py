"""Builds the app's tasks from its conf: the one table of models and labels drives everything."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.classes import label_dict
from lib.config import AppConfig, conf_summary, parse_conf
from lib.datastore import labeled_images_now, revision_progress
from lib.infers.attention import AttentionInfer
from lib.networks.inference import NetworkCache
from lib.infers.segmentation import SuPreMSegmentation
from lib.networks import validate_checkpoint
from lib.rounds.manager import RoundManager
from lib.trainers.round import RoundTrainTask, run_round
from lib.trainers.segmentation import SuPreMTrainer
from lib.importance.engines import make_engine
from lib.scoring.importance import ImportanceScoring
from lib.importance.scorer import VolumeScorer
from lib.strategies.importance import ImportanceStrategy
from lib.weights import WeightsRegistry

logger = logging.getLogger(__name__)


@dataclass
class Tasks:
    cfg: AppConfig
    registry: WeightsRegistry
    cache: NetworkCache
    infers: Dict = field(default_factory=dict)
    trainers: Dict = field(default_factory=dict)
    strategies: Dict = field(default_factory=dict)
    scoring: Dict = field(default_factory=dict)
    state_dir: str = ""
    rounds: Optional[RoundManager] = None
    datastore: Optional[Callable[[], Any]] = None

    def start_rounds(self, datastore: Callable[[], Any]) -> RoundManager:
        """Create the round manager (log in the state folder) and the ``round`` train task."""
        backbone_trainers = {b: t for b, t in self.trainers.items() if b in self.cfg.models}
        self.datastore = datastore

        def one_round(entry):
            return run_round(
                entry, backbone_trainers, self.scoring.get("importance"), datastore(), self.cfg.labels
            )

        self.rounds = RoundManager(
            os.path.join(self.state_dir, "rounds"),
            one_round,
            every_labels=self.cfg.round_every_labels,
            interval_s=self.cfg.round_interval_s,
            list_labels=lambda: labeled_images_now(datastore()),  # as saved now, by any process
        )
        if backbone_trainers:
            self.trainers["round"] = RoundTrainTask(self.rounds.trigger, self.rounds.info)
        return self.rounds

    @property
    def label_dict(self) -> Dict[str, int]:
        return label_dict(self.cfg.labels)

    def info(self) -> Dict:
        info = {"conf": conf_summary(self.cfg), "weights": self.registry.summary()}
        if self.rounds is not None:
            info["rounds"] = self.rounds.info()
        if self.datastore is not None:
            info["revision"] = revision_progress(self.datastore(), self.cfg.labels)
        return {"suprem": info}


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
    state_dir = cfg.state_dir or (
        os.path.join(model_dir, "state") if studies.startswith(("http://", "https://")) else os.path.join(studies, ".suprem")
    )
    tasks.state_dir = state_dir
    # Pre-processed volumes on disk, reused by later rounds (scoring and training); keyed by the recipe.
    cache_dir = (cfg.cache_dir or os.path.join(state_dir, "cache")) if cfg.preprocess_cache else None
    scorer = VolumeScorer(
        cfg.models,
        registry,
        cfg.labels,
        cfg.recipe,
        cache,
        device=cfg.device,
        entropy=cfg.entropy,
        normalise_score=cfg.normalise_score,
        cache_dir=cache_dir,
    )
    tasks.infers["attention"] = AttentionInfer(scorer)
    if not cfg.skip_trainers:
        # Only backbones with weights: fine-tuning one from nothing would publish an untrained model.
        for b in [m for m in cfg.models if registry.available(m)]:
            tasks.trainers[b] = SuPreMTrainer(
                b,
                registry,
                cfg.labels,
                cfg.recipe,
                model_dir=model_dir,
                split_file=os.path.join(state_dir, "split.json"),
                roi=(cfg.train_roi,) * 3,
                max_epochs=cfg.train_epochs,
                num_samples=cfg.train_num_samples,
                val_fraction=cfg.val_fraction,
                label_map=cfg.train_label_map,
                amp=cfg.train_amp,
                cache_dir=cache_dir,
                gpus=cfg.train_gpus,
                pseudo_weight=cfg.pseudo_weight,
            )
    if not cfg.skip_scoring:
        ray_options = (
            dict(address=cfg.ray_address, workers=cfg.ray_workers, gpus_per_worker=cfg.ray_gpus_per_worker)
            if cfg.scoring_engine == "ray"
            else {}
        )
        tasks.scoring["importance"] = ImportanceScoring(scorer, engine=make_engine(scorer, cfg.scoring_engine, **ray_options))
    if not cfg.skip_strategies:
        tasks.strategies.update(
            {
                "importance": ImportanceStrategy(hold_s=cfg.hold_s, organs_per_sample=cfg.organs_per_sample),
                "random": Random(),
                "first": First(),
            }
        )
    for b in cfg.models:
        logger.info(f"Model {b}: {registry.info(b)}")
    return tasks


def checked_local_datastore(studies: str, allowed_labels) -> "CheckedLocalDatastore":
    """MONAI Label's local datastore, with MONAI Label's settings, that checks labels before saving."""
    from monailabel.config import settings

    from lib.datastore import CheckedLocalDatastore

    return CheckedLocalDatastore(
        studies,
        extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
        auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
        read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        allowed_labels=allowed_labels,
    )


def checked_dicomweb_datastore(datastore, label_dict):
    """MONAI Label's DICOMweb datastore (as MONAILabelApp built it from its settings) given the app's label
    checks, segment names and class indices; any other remote datastore (XNAT, DSA) is returned as is."""
    from monailabel.datastore.dicom import DICOMWebDatastore

    from lib.datastore.dicomweb import CheckedDICOMWebDatastore

    if type(datastore) is not DICOMWebDatastore:
        return datastore
    datastore.__class__ = CheckedDICOMWebDatastore  # same state (client, cache folder, watcher), checked methods
    return datastore.set_labels(label_dict)
