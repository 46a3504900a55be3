"""Builds the app's tasks from its conf: the one table of models and labels drives everything."""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.classes import label_dict
from lib.config import AppConfig, conf_summary, parse_conf
from lib.datastore import labeled_images_now, revision_progress
from lib.infers.attention import AttentionInfer
from lib.networks.inference import NetworkCache
from lib.infers.segmentation import SuPreMSegmentation
from lib.rounds.log import DONE, RoundLog
from lib.rounds.manager import LOG_FILE, RoundManager
from lib.trainers.round import RoundTrainTask, run_round
from lib.trainers.segmentation import SuPreMTrainer
from lib.importance.configured import scoring_engine, volume_scorer, weights_registry
from lib.monailabel_private import cancel_queued_tasks, queue_threads_alive, retype
from lib.stopping import end_child_processes, install_stop_handlers, on_stop, stop_reason
from lib.scoring.importance import ImportanceScoring
from lib.strategies.importance import ImportanceStrategy
from lib.strategies.panel import RandomUnlessPanel
from lib.transforms.recipe import PRESETS, recipe_fit
from lib.weights import WeightsRegistry

logger = logging.getLogger(__name__)

# Next Sample's hand-outs, in the state folder (``ImportanceStrategy.state_file``).
HANDOUTS_FILE = "handouts.json"

# Seconds a stopping server gives its train / scoring subprocesses to end on SIGTERM before SIGKILL.
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class TaskSwitches:
    """Which of MONAI Label's optional task kinds this app builds. MONAI Label's own switches
    (``MONAI_LABEL_TASKS_TRAIN`` / ``_SCORING`` / ``_STRATEGY``) only hide a kind from ``/info/``; here a
    kind switched off (there, or by ``skip_trainers`` / ``skip_scoring`` / ``skip_strategies``) is not
    built, so nothing (rounds included) can run it."""

    train: bool = True
    scoring: bool = True
    strategy: bool = True


def monailabel_switches() -> TaskSwitches:
    """MONAI Label's task switches, as its settings read them from the environment."""
    from monailabel.config import settings

    return TaskSwitches(
        train=bool(settings.MONAI_LABEL_TASKS_TRAIN),
        scoring=bool(settings.MONAI_LABEL_TASKS_SCORING),
        strategy=bool(settings.MONAI_LABEL_TASKS_STRATEGY),
    )


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
    switches: TaskSwitches = TaskSwitches()

    def start_rounds(self, datastore: Callable[[], Any]) -> RoundManager:
        """Create the round manager (log in the state folder) and the ``round`` train task. With training
        switched off the manager keeps the log and counts labels, but runs no round (interrupted ones
        included) and there is no ``round`` task."""
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
            requeue_interrupted=True,  # a round cut short by a stop or a crash runs again at the next start
            off=None if self.switches.train else "training is switched off (MONAI_LABEL_TASKS_TRAIN or skip_trainers)",
        )
        if backbone_trainers:
            self.trainers["round"] = RoundTrainTask(self.rounds.trigger, self.rounds.info)
        return self.rounds

    def stop(self, grace_s: float = STOP_GRACE_S) -> List[int]:
        """The server is stopping: no round starts; the round this process runs is logged ``interrupted``;
        MONAI Label's train / scoring subprocesses (and all else this process started) are ended (SIGTERM,
        SIGKILL after ``grace_s``), then the rounds they ran are logged ``interrupted`` too. A round's new
        model is published only at its end, so the previous one stays. Returns the pids ended."""
        reason = stop_reason() or "the server stopped"
        if self.rounds is not None:
            self.rounds.interrupt(f"{reason} while the round ran")
        ended = end_background_tasks(grace_s)
        if self.rounds is not None:
            self.rounds.log.mark_interrupted()
        return ended

    def connect(self, datastore):
        """Give the datastore the strategy's record of what Next Sample handed out at organ level: a final
        label saved without ``revised`` (OHIF, 3D Slicer) then counts the organs handed to its annotator."""
        strategy = self.strategies.get("importance")
        if strategy is not None and hasattr(datastore, "handouts"):
            anonymous = bool(getattr(datastore, "anonymous_handouts", False))
            datastore.handouts = functools.partial(strategy.organs_handed_to, anonymous=anonymous)
        return datastore

    def keep_preannotation(self, datastore, request: Dict, result: Dict) -> None:
        """Keep the label a segmentation infer served for a datastore image as its pre-annotation (what a
        later final label is compared with, organ by organ), when Next Sample holds organs of that image for
        the asking client: only then is it compared. A failure here is logged: the infer answers."""
        task = self.infers.get(request.get("model"))
        image_id, file = request.get("image"), (result or {}).get("file")
        save = getattr(datastore, "save_preannotation", None)
        if save is None or not isinstance(task, SuPreMSegmentation) or not file or not os.path.isfile(file):
            return
        if not isinstance(image_id, str) or os.path.isabs(image_id):  # an uploaded file, not a datastore image
            return
        handouts = getattr(datastore, "handouts", None)  # the strategy's record, bound by ``connect``
        if handouts is None or not handouts(request.get("client_id"), image_id):
            return
        models = ((result or {}).get("params") or {}).get("models")
        info = {"model": request.get("model"), "client_id": request.get("client_id"), "models": models}
        try:
            save(image_id, file, info)
        except Exception as e:  # noqa: BLE001 - the annotator still gets the label
            logger.warning(f"{image_id}: the pre-annotation served by {request.get('model')} was not kept: {e}")

    @property
    def label_dict(self) -> Dict[str, int]:
        return label_dict(self.cfg.labels)

    def info(self) -> Dict:
        info = {"conf": conf_summary(self.cfg), "weights": self.registry.summary()}
        for b, why in weights_misfits(self.registry, self.cfg, info["weights"]).items():
            info["weights"][b]["misfit"] = why
        if self.rounds is not None:
            info["rounds"] = self.rounds.info()
        if self.datastore is not None:
            info["revision"] = revision_progress(self.datastore(), self.cfg.labels)
        strategy = self.strategies.get("importance")
        if strategy is not None:
            info["handouts"] = strategy.open_handouts()
        return {"suprem": info}


def weights_misfits(registry: WeightsRegistry, cfg: AppConfig, infos: Optional[Dict[str, Dict]] = None) -> Dict[str, str]:
    """Backbone -> why its weights do not fit the server's recipe (grid, window): released SuPreM weights
    were trained on the recipe preset's; starter weights say in their sidecar what they were trained on.
    ``infos``: the registry's summary when the caller has just read it (else it is read here)."""
    out = {}
    for b in cfg.models:
        info = infos[b] if infos is not None and b in infos else registry.info(b)
        base = registry.weights[b].base_source if b in registry.weights else "none"
        source = "fine-tuned" if "base" in info else base  # a fine-tuned model's sidecar does not say its grid
        trained = info if source == "starter" else {}
        if source == "released":
            recipe = PRESETS["recipe"]
            trained = {"spacing": list(recipe.spacing), "roi": list(recipe.roi), "preset": "recipe"}
        why = recipe_fit(trained, cfg.recipe)
        if why:
            out[b] = f"{source} weights {why}"
    return out


def effective_switches(cfg: AppConfig, switches: Optional[TaskSwitches] = None) -> TaskSwitches:
    """MONAI Label's switches (default: its settings) and the conf's ``skip_*`` keys: off in either is off."""
    on = switches or monailabel_switches()
    return TaskSwitches(
        train=on.train and not cfg.skip_trainers,
        scoring=on.scoring and not cfg.skip_scoring,
        strategy=on.strategy and not cfg.skip_strategies,
    )


def fine_tuning_tasks(cfg: AppConfig, registry: WeightsRegistry, model_dir: str, state_dir: str, cache_dir) -> Dict:
    """Backbone -> its train task, for the backbones with weights: fine-tuning one from nothing would
    publish an untrained model."""
    return {
        b: SuPreMTrainer(
            b,
            registry,
            cfg.labels,
            cfg.recipe,
            model_dir=model_dir,
            split_file=os.path.join(state_dir, "split.json"),
            roi=cfg.train_roi,  # None: the recipe's window, as the infer task slides it
            max_epochs=cfg.train_epochs,
            num_samples=cfg.train_num_samples,
            val_fraction=cfg.val_fraction,
            label_map=cfg.train_label_map,
            amp=cfg.train_amp,
            cache_dir=cache_dir,
            gpus=cfg.train_gpus,
            pseudo_weight=cfg.pseudo_weight,
        )
        for b in cfg.models
        if registry.available(b)
    }


def resolved_registry(cfg: AppConfig, model_dir: str) -> WeightsRegistry:
    """The weights of each configured backbone, found (or downloaded) now; misfits logged."""
    registry = weights_registry(cfg, model_dir)
    for b, why in weights_misfits(registry, cfg).items():
        logger.warning(f"{b}: {why}")
    return registry


def build_tasks(app_dir: str, studies: str, conf: Dict[str, str], switches: Optional[TaskSwitches] = None) -> Tasks:
    """Every task of the app from its conf. ``switches``: MONAI Label's (default: its settings); a kind
    switched off there or by the conf's ``skip_*`` keys is not built."""
    cfg = parse_conf(conf)
    on = effective_switches(cfg, switches)
    model_dir = cfg.model_dir or os.path.join(app_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    registry = resolved_registry(cfg, model_dir)
    cache = NetworkCache()
    tasks = Tasks(cfg=cfg, registry=registry, cache=cache, switches=on)
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
    scorer = volume_scorer(cfg, registry, cache, cache_dir)
    tasks.infers["attention"] = AttentionInfer(scorer)
    if on.train:
        tasks.trainers.update(fine_tuning_tasks(cfg, registry, model_dir, state_dir, cache_dir))
    if on.scoring:
        # One scoring of the pool at a time, across the server's scoring and train (round) subprocesses.
        lock = os.path.join(state_dir, "scoring.lock")
        tasks.scoring["importance"] = ImportanceScoring(scorer, engine=scoring_engine(scorer, cfg), lock_path=lock)
    if on.strategy:
        importance = ImportanceStrategy(
            hold_s=cfg.hold_s,
            organs_per_sample=cfg.organs_per_sample,
            diversity_temperature=cfg.diversity_temperature,
            diversity_decay=cfg.diversity_decay,
            round_of=rounds_done(state_dir),
            state_file=os.path.join(state_dir, HANDOUTS_FILE),  # a restart keeps who holds what
        )
        # One importance strategy, whichever name asks: its hand-outs are what a later save is read against.
        random = Random()
        if cfg.random_strategy == "importance":
            random = RandomUnlessPanel(importance)
            logger.info("Next Sample 'random' from OHIF's panel is answered by 'importance' (--conf random_strategy)")
        tasks.strategies.update({"importance": importance, "random": random, "first": First()})
    for b in cfg.models:
        logger.info(f"Model {b}: {registry.info(b)}")
    return tasks


def rounds_done(state_dir: str) -> Callable[[], int]:
    """How many rounds of this state folder ended done (read from the round log at each call): the round
    index of the diverse batch's temperature schedule."""
    path = os.path.join(state_dir, "rounds", LOG_FILE)

    def count() -> int:
        if not os.path.exists(path):
            return 0
        return sum(1 for e in RoundLog(path).entries() if e.get("status") == DONE)

    return count


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
    # Same state (client, cache folder, watcher), checked methods.
    return retype(datastore, CheckedDICOMWebDatastore).set_labels(label_dict)


def stop_on_signals(on_signal: Callable[[int], None]) -> None:
    """On SIGINT / SIGTERM call ``on_signal(signum)`` first, then what was there before: in the server
    uvicorn's graceful shutdown; in MONAI Label's subprocesses Ctrl-C's KeyboardInterrupt, and for SIGTERM
    ``lib.stopping.StopRequested``, so a round there is logged ``interrupted`` as the process unwinds."""
    if install_stop_handlers():
        on_stop(on_signal)


def end_background_tasks(grace_s: float = STOP_GRACE_S) -> List[int]:
    """MONAI Label runs train / scoring / batch-infer requests as subprocesses fed by one queue per kind:
    cancel the requests waiting, refuse new ones, and end the running subprocesses with every other
    process this one started (SIGTERM, then SIGKILL after ``grace_s``). Returns the pids ended."""
    executors = cancel_queued_tasks()
    return end_child_processes(grace_s, busy=lambda: queue_threads_alive(executors))
