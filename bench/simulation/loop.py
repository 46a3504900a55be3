"""Rounds of one arm (a strategy and a revision mode) on one seed, with the project's own pieces:

pick (MONAI Label strategies on the app's datastore: ``importance`` after the app's scoring method ran;
``random``, ``first``; MONAI Label's ``Epistemic`` top-1 on a stored number for mean entropy, predicted
organ size and, as the positive control, the true error), revise (the simulated annotator saves final
labels), retrain (``SuPreMTrainer`` from the previous round's model, a fixed number of steps per labelled
volume, published through the ``WeightsRegistry``), test (the ``SuPreMSegmentation`` infer task on the
held-out set, Dice per organ).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from monai.utils import set_determinism
from monailabel.datastore.local import LocalDatastore
from monailabel.tasks.activelearning.epistemic import Epistemic
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from lib.networks import validate_checkpoint
from lib.classes import CLASS_INDEX, LABEL_SETS
from lib.datastore import CheckedLocalDatastore, pool_images, revised_organs
from lib.networks.inference import NetworkCache
from lib.infers.segmentation import SuPreMSegmentation
from lib.metrics import organ_dice, summarise
from lib.importance.records import INFO_KEY
from lib.scoring.importance import ImportanceScoring
from lib.importance.scorer import VolumeScorer
from lib.strategies.importance import ImportanceStrategy
from lib.trainers.segmentation import SuPreMTrainer
from lib.trainers.starter import train_starter
from lib.transforms.recipe import Recipe
from lib.weights import WeightsRegistry

from .annotator import SimulatedAnnotator
from .config import STRATEGIES, SimConfig, arm_name
from .data import Study, make_studies, pool_studies
from lib.importance.epistemic import EPISTEMIC_KEY as ENTROPY_KEY
from lib.importance.epistemic import mean_binary_entropy

BACKBONE = "segresnet"
SIZE_KEY = "predicted_size"  # voxels of the predicted organ masks on the working grid
ORACLE_KEY = "true_error"  # 1 - the current model's mean organ Dice against the ground truth
ORACLE_ORGANS_KEY = "true_organ_error"  # organ -> 1 - Dice
DEVICE = "cpu"  # bench/simulate.py --device sets it
Log = Callable[[str], None]


def recipe_of(cfg: SimConfig) -> Recipe:
    return Recipe(spacing=tuple(cfg.grid_mm), roi=tuple(cfg.roi), overlap=cfg.overlap,
                  sw_batch_size=cfg.sw_batch_size, amp="none")


def labels_of(cfg: SimConfig) -> List[str]:
    return list(LABEL_SETS[cfg.labels])


def round_seed(seed: int, rnd: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(rnd), 77]).generate_state(1)[0])


class CompanionCache(NetworkCache):
    """The network cache of a scorer that holds companions: ``segresnet#2`` is built as a SegResNet (the
    cache keys networks by their file, so the models stay apart)."""

    def get(self, backbone: str, path: str, device, **kwargs):
        return super().get(backbone.split("#")[0], path, device, **kwargs)


class ModelSet:
    """The weights a scorer reads: the served model under ``segresnet`` and its companions under
    ``segresnet#2``... (each in its own registry)."""

    def __init__(self, registries: Dict[str, WeightsRegistry]):
        self.registries = registries

    def available(self, name: str) -> bool:
        return self.registries[name].available(BACKBONE)

    def current_path(self, name: str) -> Optional[str]:
        return self.registries[name].current_path(BACKBONE)

    def info(self, name: str) -> Dict:
        return self.registries[name].info(BACKBONE)


class Model:
    """One backbone's weights in ``model_dir`` (starting from ``starter``), its infer task and trainer.

    ``companions``: other models (of other starters, retrained on the same labels) that score the pool
    with it, as a deployment's several backbones do: the importance score's inconsistency term and the
    mean probability then come from all of them; the served model alone is tested."""

    def __init__(self, cfg: SimConfig, model_dir: str, starter: Optional[str], split_file: str,
                 publish_to: Optional[str] = None, scoring: Optional[Dict] = None, lr: Optional[float] = None,
                 companions: Sequence["Model"] = ()):
        self.cfg = cfg
        os.makedirs(model_dir, exist_ok=True)
        self.model_dir = model_dir
        self.registry = WeightsRegistry(model_dir, validate_checkpoint, use_pretrained_model=False)
        if starter:
            shutil.copyfile(starter, self.registry.starter_path(BACKBONE))
        self.registry.resolve(BACKBONE)
        self.recipe = recipe_of(cfg)
        self.labels = labels_of(cfg)
        self.class_indices = [CLASS_INDEX[o] for o in self.labels]
        self.cache = CompanionCache()
        self.companions = list(companions)
        self.infer = SuPreMSegmentation([BACKBONE], self.registry, self.labels, self.recipe, self.cache)
        self.trainer = SuPreMTrainer(
            BACKBONE, self.registry, self.labels, self.recipe, model_dir=model_dir, split_file=split_file,
            max_epochs=1,  # crops of the recipe's window (the product's default)
            num_samples=cfg.num_samples, lr=lr or cfg.lr, val_fraction=0.0,
            publish_to=publish_to, amp="none", pseudo_weight=cfg.pseudo_weight,
        )
        models = {BACKBONE: self.registry}
        models.update({f"{BACKBONE}#{i + 2}": c.registry for i, c in enumerate(self.companions)})
        self.scorer = VolumeScorer(list(models), ModelSet(models), self.labels, self.recipe, self.cache,
                                   device=DEVICE, **(scoring or {}))
        self.scoring = ImportanceScoring(self.scorer)

    def predict(self, path: str) -> np.ndarray:
        """Label map on the input grid, from the model served now (the app's infer task)."""
        _, data = self.infer({"image": path, "device": DEVICE, "skip_writer": "true", "logging": "WARNING"})
        return np.asarray(torch.as_tensor(data["pred"]).cpu().numpy(), np.uint8)

    def train(self, datastore, name: str, steps_per_label: int, seed: int) -> Dict:
        """Retrain on the datastore's final labels, ``steps_per_label`` steps (epochs) per labelled volume,
        then publish the last weights."""
        n = len(datastore.datalist())
        epochs = max(1, int(steps_per_label))
        set_determinism(seed=seed)
        try:
            res = self.trainer({"name": name, "max_epochs": epochs, "device": DEVICE, "source": f"simulation {name}"},
                               datastore)
        finally:
            set_determinism(seed=None)
            shutil.rmtree(os.path.join(self.model_dir, f"train_{BACKBONE}", name), ignore_errors=True)
        for c in self.companions:  # the same labels, crops and steps
            c.train(datastore, name, steps_per_label, seed)
        return {"epochs": epochs, "labels_used": n, "published": res.get("published")}

    def test_dice(self, studies: List[Study]) -> Dict:
        """Dice per organ and its mean over organs (``summarise``), and under ``volumes`` the per-volume,
        per-organ table it came from (what the bootstrap intervals resample)."""
        import nibabel as nib

        per_volume = []
        for s in studies:
            pred = self.predict(s.image)
            gt = np.asarray(nib.load(s.gt).dataobj)
            per_volume.append(organ_dice(pred, gt, self.class_indices))
        return dict(summarise(per_volume, self.labels), volumes=[v.tolist() for v in per_volume])

    def _score_probabilities(self, datastore, key: str, score) -> None:
        """``score(probs)`` of each unlabelled image's (M, C, ...) probabilities, stored under ``key``."""
        for image_id in datastore.get_unlabeled_images():
            probs = self.scorer.probabilities(self.scorer.preprocess(datastore.get_image_uri(image_id)))
            datastore.update_image_info(image_id, {key: score(probs)})

    def score_entropy(self, datastore) -> None:
        """Mean binary entropy of the model's probabilities, per unlabelled image, stored where MONAI
        Label's ``Epistemic`` strategy reads it (``epistemic_entropy``)."""
        self._score_probabilities(datastore, ENTROPY_KEY, mean_binary_entropy)

    def score_size(self, datastore) -> None:
        """Predicted organ size (voxels of the mean probability > 0.5, all organs) per unlabelled image."""
        self._score_probabilities(datastore, SIZE_KEY, lambda probs: float((probs.float().mean(0) > 0.5).sum()))

    def score_true_error(self, datastore, gt: Dict[str, str], partly: bool = False) -> None:
        """The positive control's score: per unlabelled image, 1 - the served model's Dice against the
        ground truth (mean over organs, and per organ; an organ absent from both counts as no error).

        ``partly`` (organ-level revision): partly revised images too (``_oracle_of_organs`` picks among
        them by the error of their organs not yet revised). With ``oracle_organs`` "excess" the per-organ
        error stored is ``excess_over_organ_mean`` over the images scored (the mean stays the true error)."""
        import nibabel as nib

        errors_of = {}
        for image_id in pool_images(datastore) if partly else datastore.get_unlabeled_images():
            pred = self.predict(datastore.get_image_uri(image_id))
            dice = organ_dice(pred, np.asarray(nib.load(gt[image_id]).dataobj), self.class_indices)
            errors_of[image_id] = {o: 0.0 if math.isnan(d) else 1.0 - float(d) for o, d in zip(self.labels, dice)}
        organ_errors = excess_over_organ_mean(errors_of) if self.cfg.oracle_organs == "excess" else errors_of
        for image_id, errors in errors_of.items():
            datastore.update_image_info(image_id, {ORACLE_KEY: float(np.mean(list(errors.values()))),
                                                   ORACLE_ORGANS_KEY: organ_errors[image_id]})


@dataclass
class SeedContext:
    """What the arms of one seed share: the pool, the test set, the starter and its round-0 results."""

    seed: int
    folder: str
    pool: List[Study]
    test: List[Study]
    starter: str
    replay: List[Study] = field(default_factory=list)  # labelled from the start (the starter's own phantoms)
    companions: List[str] = field(default_factory=list)  # starters of the models scoring beside it
    round0: Dict[str, float] = field(default_factory=dict)
    round0_s: float = 0.0
    scores0: Dict[str, Dict[str, Dict]] = field(default_factory=dict)  # score kind -> image id -> image info


def prepare_seed(cfg: SimConfig, seed: int, work: str, starters: Sequence[str], log: Log, tag: str = "") -> SeedContext:
    """The seed's pool and test phantoms, the starter's own phantoms (replayed when ``replay_starter``),
    and the starting model's test Dice, in ``work/seed_<seed><tag>``. ``starters``: the served model's
    starter, then its companions'."""
    folder = os.path.join(work, f"seed_{seed}{tag}")
    shutil.rmtree(folder, ignore_errors=True)
    t = time.time()
    # An organ-local pool has its own kind of test set (the starter's site, hard_fraction of it with one organ
    # unlike the starter's); otherwise the test set is balanced: the model must serve every site.
    organ_local = cfg.pool == "organ_local"
    pool = pool_studies(os.path.join(folder, "pool"), os.path.join(folder, "pool_gt"), cfg.n_pool, seed, cfg)
    test = make_studies(os.path.join(folder, "test"), os.path.join(folder, "test_gt"), "test", cfg.n_test, seed, cfg,
                        kind=cfg.pool if organ_local else "balanced")
    replay = []
    if cfg.replay_starter:
        replay = starter_studies(cfg, os.path.join(folder, "replay"), os.path.join(folder, "replay_gt"),
                                 cfg.starter_seed_of(seed))
    log(f"seed {seed}: {len(pool)} pool ({cfg.pool}) + {len(test)} test phantoms + {len(replay)} replayed in "
        f"{time.time() - t:.0f} s; pool {' '.join(s.tag() for s in pool)}")
    ctx = SeedContext(seed, folder, pool, test, starters[0], replay, list(starters[1:]))
    t = time.time()
    m = Model(cfg, os.path.join(folder, "round0_model"), ctx.starter, os.path.join(folder, "round0_split.json"))
    ctx.round0 = m.test_dice(test)
    ctx.round0_s = time.time() - t
    log(f"seed {seed}: starting model test Dice {ctx.round0['mean']:.3f} ({ctx.round0_s:.0f} s)")
    return ctx


def starter_sites(cfg: SimConfig) -> List[str]:
    """The sites the starting model learns from: ``starter_site`` is one site or a comma list (``A,B``)."""
    return [s.strip() for s in cfg.starter_site.split(",") if s.strip()]


def starter_studies(cfg: SimConfig, folder: str, gt_folder: str, starter_seed: int) -> List[Study]:
    """The phantoms a starter learns from (its sites, no hard case): the same ones where it is trained
    and where a seed replays them."""
    return make_studies(folder, gt_folder, "starter", cfg.n_starter, starter_seed, cfg, sites=starter_sites(cfg),
                        hard_fraction=0.0, prefix="replay")


def starter_of(cfg: SimConfig, work: str, dest: str, log: Log) -> str:
    """The 'pre-trained backbone': SegResNet from scratch on ``n_starter`` phantoms of the starter's sites,
    with the app's ``train_starter``; published to ``dest``."""
    folder = os.path.join(work, "starter")
    shutil.rmtree(folder, ignore_errors=True)
    studies_dir = os.path.join(folder, "studies")
    starter_studies(cfg, studies_dir, os.path.join(studies_dir, "labels", "final"), cfg.starter_seed)
    ds = LocalDatastore(studies_dir, extensions=("*.nii.gz",), auto_reload=False)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    model_dir = os.path.join(folder, "model")
    registry = WeightsRegistry(model_dir, validate_checkpoint, use_pretrained_model=False)
    registry.resolve(BACKBONE)  # nothing there: trained from scratch
    t = time.time()
    train_starter(ds, registry, labels_of(cfg), recipe_of(cfg), folder, steps=cfg.starter_iters,
                  crops_per_step=cfg.num_samples, lr=cfg.lr, seed=cfg.starter_seed, publish_to=dest, device=DEVICE,
                  source="simulation starter")
    log(f"starter {cfg.starter_seed}: {cfg.n_starter} phantoms of site(s) {cfg.starter_site}, {cfg.starter_iters} steps, "
        f"{time.time() - t:.0f} s")
    shutil.rmtree(folder, ignore_errors=True)
    return dest


STARTER_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "out", "starters")


def cached_starter(cfg: SimConfig, work: str, log: Log, cache: str = STARTER_CACHE, fresh: bool = False) -> str:
    """The starting model of ``cfg``, trained once and kept under ``cache`` as
    ``starter_<config>_<starter_key>.pth``: the key hashes every setting it depends on, so a changed
    setting trains a new one and an unchanged one is reused by every script and seed."""
    path = os.path.join(cache, f"starter_{cfg.name}_{cfg.starter_key()}.pth")
    if fresh or not os.path.exists(path):
        starter_of(cfg, work, path, log)
    else:
        log(f"starter: reusing {path}")
    return path


def cached_starters(cfg: SimConfig, work: str, log: Log, cache: str = STARTER_CACHE,
                    fresh: bool = False) -> Dict[int, List[str]]:
    """seed -> the starting models of its ``cfg.models`` models: ``cfg.starters`` distinct ones (starter
    seeds in turn), each trained once and cached; seed ``s``'s model ``m`` starts from starter ``s + m``."""
    from dataclasses import replace

    paths: Dict[int, str] = {}

    def starter(k: int) -> str:
        if k not in paths:
            paths[k] = cached_starter(replace(cfg, starter_seed=k), work, log, cache, fresh)
        return paths[k]

    return {seed: [starter(cfg.starter_seed_of(seed + m)) for m in range(cfg.models)] for seed in cfg.seeds}


# Image-info keys a scored strategy reads (the oracle's per-organ errors ride along).
SCORE_KEYS = {"importance": (INFO_KEY,), "entropy": (ENTROPY_KEY,), "size": (SIZE_KEY,),
              "oracle": (ORACLE_KEY, ORACLE_ORGANS_KEY)}
# Strategies that score with the models' probabilities (all of them, companions included).
MODEL_SCORED = ("importance", "entropy", "size")


def _strategy(name: str, revision: str = "volume", organs_per_volume: int = 1):
    kind = STRATEGIES[name][0]
    if kind == "oracle" and revision == "organ":
        return _oracle_of_organs(organs_per_volume)
    if kind in ("entropy", "size", "oracle"):  # MONAI Label's top-1 on a stored number
        return Epistemic(k=1, key=SCORE_KEYS[kind][0])
    return {"importance": lambda: ImportanceStrategy(hold_s=0.0), "random": Random, "first": First,
            "all": First}[kind]()


def excess_over_organ_mean(errors_of: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Image -> organ -> how far the organ's error on the image is above that organ's mean error over the
    images (0 where below): what is unusually wrong, not what is hard everywhere."""
    organs = {o for errors in errors_of.values() for o in errors}
    mean = {o: float(np.mean([e[o] for e in errors_of.values() if o in e])) for o in organs}
    return {i: {o: max(0.0, e - mean[o]) for o, e in errors.items()} for i, errors in errors_of.items()}


def _oracle_organs(datastore, image_id: str) -> Dict[str, float]:
    """The oracle's true error per organ of the image, its organs revised by now counted as none."""
    revised = set(revised_organs(datastore, image_id) or ())
    errors = datastore.get_image_info(image_id).get(ORACLE_ORGANS_KEY) or {}
    return {o: 0.0 if o in revised else float(e) for o, e in errors.items()}


def _oracle_of_organs(top_k: int):
    """The organ-level oracle's Next Sample: among the images still to revise (``pool_images``: unlabelled
    and partly revised, as the app's strategy ranks them), the one whose ``top_k`` worst organs not yet
    revised hold the largest true error; {} when no error is left."""

    def pick(request, datastore) -> Dict:
        scored = [(sum(sorted(_oracle_organs(datastore, i).values())[-top_k:]), i) for i in pool_images(datastore)]
        best = max(scored, default=(0.0, None))
        return {"id": best[1]} if best[0] > 0 else {}

    return pick


def _score_pool(kind: str, options: Dict, model: "Model", ds, ctx: "SeedContext", rnd: int,
                partly: bool = False) -> None:
    """Score the unlabelled pool for the strategy (``partly``: partly revised images too); the first
    round's scores come from the starter, the same for every arm of the seed, so they are reused."""
    if kind not in SCORE_KEYS:
        return
    keys = SCORE_KEYS[kind]
    cache_key = f"{kind}:{sorted(options.items())}"
    cached = ctx.scores0.get(cache_key) if rnd == 1 else None
    if cached:
        for image_id, info in cached.items():
            ds.update_image_info(image_id, info)
        return
    if kind == "importance":
        model.scoring({}, ds)
    elif kind == "entropy":
        model.score_entropy(ds)
    elif kind == "size":
        model.score_size(ds)
    else:
        model.score_true_error(ds, {s.id: s.gt for s in ctx.pool}, partly)
    if rnd == 1:
        ctx.scores0[cache_key] = {i: {k: ds.get_image_info(i).get(k) for k in keys} for i in ds.get_unlabeled_images()}


def _organs_to_revise(kind: str, pick: Dict, ds, n: int) -> List[str]:
    """The organs an organ-level revision fixes: the importance answer's list, or (oracle) the organs of
    largest true error."""
    if kind == "oracle":
        errors = _oracle_organs(ds, pick["id"])
        return [o for o, e in sorted(errors.items(), key=lambda kv: -kv[1]) if e > 0][:n]
    return list(pick.get("organs") or [])[:n]


def _label_replay(ds, replay: List[Study], annotator: SimulatedAnnotator) -> None:
    """The labelled set the arm starts with: the starter's own phantoms (already in the datastore's
    folder) saved with their full labels, as a whole-volume revision would."""
    for s in replay:
        annotator.revise(ds, s.id)


def run_arm(cfg: SimConfig, ctx: SeedContext, strategy: str, revision: str, log: Log) -> List[Dict]:
    """All rounds of one arm; returns one row per round (round 0 = the starting model)."""
    arm = arm_name(strategy, revision)
    folder = os.path.join(ctx.folder, arm.replace("/", "_"))
    shutil.rmtree(folder, ignore_errors=True)
    studies_dir = os.path.join(folder, "studies")
    os.makedirs(studies_dir)
    for s in ctx.pool + ctx.replay:
        shutil.copy2(s.image, os.path.join(studies_dir, os.path.basename(s.image)))
    # The app's datastore: an organ-level save names its revised organs, the label is merged and the
    # trainer weighs the organs nobody revised by ``cfg.pseudo_weight``.
    ds = CheckedLocalDatastore(studies_dir, extensions=("*.nii.gz",), auto_reload=False,
                               allowed_labels=[CLASS_INDEX[o] for o in labels_of(cfg)])
    kind, options = STRATEGIES[strategy]
    lr = cfg.finetune_lr or cfg.lr
    companions = []
    if kind in MODEL_SCORED:  # random, the oracle and the bound never read a second model: not trained
        companions = [Model(cfg, os.path.join(folder, f"companion_{i + 2}"), path,
                            os.path.join(folder, f"split_{i + 2}.json"), lr=lr)
                      for i, path in enumerate(ctx.companions)]
    model = Model(cfg, os.path.join(folder, "model"), ctx.starter, os.path.join(folder, "split.json"),
                  scoring=options, lr=lr, companions=companions)
    annotator = SimulatedAnnotator({s.id: s.gt for s in ctx.pool + ctx.replay}, model.labels, model.predict,
                                   os.path.join(folder, "tmp"))
    _label_replay(ds, ctx.replay, annotator)
    pick_strategy = _strategy(strategy, revision, cfg.organs_per_volume)
    tags = {s.id: s.tag() for s in ctx.pool}
    base = {"seed": ctx.seed, "strategy": strategy, "revision": revision}
    rows = [dict(base, round=0, volumes_revised=0, organs_revised=0, dice=ctx.round0, picked="", scored_by=0,
                 epochs=0, labels_used=0, score_s=0.0, train_s=0.0, test_s=round(ctx.round0_s, 1))]
    volumes = organs = 0
    per_round = cfg.volumes_per_round if revision == "volume" else cfg.organ_volumes_per_round
    rounds = cfg.rounds
    if kind == "all":  # the upper bound: the whole pool in one round
        per_round, rounds = len(ctx.pool), 1
    for rnd in range(1, rounds + 1):
        t = time.time()
        _score_pool(kind, options, model, ds, ctx, rnd, partly=revision == "organ")
        score_s = time.time() - t
        scored_by = len(model.scorer.active()) if kind in MODEL_SCORED else 0  # models with weights now
        random.seed(round_seed(ctx.seed, rnd))  # MONAI Label's Random draws from Python's random
        picked = []
        for _ in range(per_round):
            res = pick_strategy({"strategy": kind, "client_id": "simulated-annotator"}, ds)
            if not res:
                break
            image_id = res["id"]
            listed = None
            if revision == "organ":
                listed = _organs_to_revise(kind, res, ds, cfg.organs_per_volume)
            n_org = annotator.revise(ds, image_id, listed)
            volumes += 1
            organs += n_org
            picked.append(tags[image_id] + (f"[{'|'.join(listed)}]" if listed is not None else ""))
        t = time.time()
        info = model.train(ds, f"round_{rnd:03d}", cfg.steps_per_label, round_seed(ctx.seed, rnd))
        train_s = time.time() - t
        t = time.time()
        dice = model.test_dice(ctx.test)
        test_s = time.time() - t
        rows.append(dict(base, round=rnd, volumes_revised=volumes, organs_revised=organs, dice=dice,
                         scored_by=scored_by, picked=" ".join(picked), epochs=info["epochs"], labels_used=info["labels_used"],
                         score_s=round(score_s, 1), train_s=round(train_s, 1), test_s=round(test_s, 1)))
        log(f"seed {ctx.seed} {arm} round {rnd}: {volumes} volumes / {organs} organs revised, "
            f"test Dice {dice['mean']:.3f} (score {score_s:.0f} s, train {train_s:.0f} s, test {test_s:.0f} s) "
            f"picked {' '.join(picked)}")
    shutil.rmtree(folder, ignore_errors=True)
    return rows
