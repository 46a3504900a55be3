"""Presets of the active-learning simulation: ``tiny`` (the test), ``small`` (2 CPU cores), ``gpu``, ``large``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional, Tuple

from lib.classes import LABEL_SETS
from lib.config import PSEUDO_WEIGHT

# Strategy names -> (how the pool is scored and picked, the app's scorer options or {}).
STRATEGIES: Dict[str, Tuple[str, Dict]] = {
    "importance": ("importance", {"entropy": "positive"}),
    "importance-binary": ("importance", {"entropy": "binary"}),
    # The app's calibrated mode (--conf importance_mode calibrated, issue 22).
    "calibrated": ("importance", {"mode": "calibrated"}),
    "random": ("random", {}),
    "first": ("first", {}),
    # Mean entropy of the model's probabilities over the volume, ranked by MONAI Label's Epistemic strategy.
    "entropy": ("entropy", {}),
    # Predicted organ size (voxels of the organ masks): the best naive ranking in error capture.
    "size": ("size", {}),
    # The positive control: the largest true error of the current model (1 - its mean organ Dice against
    # the ground truth). Uses the ground truth, which no real strategy has; only this arm reads it.
    "oracle": ("oracle", {}),
    # The upper bound: every pool volume revised at once, one round.
    "all": ("all", {}),
}
# Strategies that name organs for organ-level revision (importance: its organ priority; oracle: true error).
ORGAN_STRATEGIES = ("importance", "oracle")
POOLS = ("balanced", "realistic", "organ_local")
REVISIONS = ("volume", "organ")
ORACLE_ORGAN_ERRORS = ("error", "excess")  # what the organ-level oracle ranks organs by (SimConfig.oracle_organs)
# The settings the starting model depends on (its cache key).
STARTER_FIELDS = ("shape", "spacing_scale", "grid_mm", "roi", "num_samples", "lr", "n_starter", "starter_iters",
                  "starter_site", "starter_seed", "labels")


@dataclass(frozen=True)
class SimConfig:
    """Everything that decides a simulation's result (the out folder and thread count do not).

    Phantoms: ``shape`` voxels at each site's own spacing times ``spacing_scale`` (so sites keep their
    spacing and field-of-view differences); the model works on a ``grid_mm`` grid (the recipe's
    resampling), trains on random ``roi`` crops and slides the same ``roi`` window with ``overlap`` (one
    window for both, as the app's train task does: a model trained on one field and slid over another
    learns where organs sit relative to a border that inference moves). Choose ``roi`` smaller than
    the working grid, so that training crops fall at random positions.

    Pool: ``balanced`` (the sites in equal shares, ``hard_fraction`` hard cases, like the test set),
    ``realistic`` (a collection: ``1 - shifted_fraction`` of it the starter's own site without a hard case,
    the rest other sites and hard cases) or ``organ_local`` (the starter's own site throughout,
    ``shifted_fraction`` of it with one organ unlike the starter's: what the model gets wrong is confined to
    one organ of a volume, the case for organ-level revision). The test set is balanced (the model must serve
    every site), except for ``organ_local``: the starter's site, ``hard_fraction`` of it with such an organ.

    Rounds: each of ``rounds`` rounds, a whole-volume arm revises ``volumes_per_round`` volumes; an
    organ-level arm revises the first ``organs_per_volume`` organs of ``organ_volumes_per_round``
    volumes. Each round retrains from the previous round's model for ``steps_per_label`` steps per
    labelled volume (so training grows with the labels and is the same for every arm at equal labels)
    and publishes the last weights. With ``replay_starter`` the labelled set starts with the starter's
    own labelled phantoms (the usual active-learning protocol: initial labels + acquired ones), which
    keeps a round on one new volume from forgetting what the starter knew.

    Starters: ``starters`` distinct starting models (starter seeds ``starter_seed + i``); seed ``s``
    starts from starter ``s % starters``, so starter variance enters the intervals.

    Models: with ``models`` 2 or more, the arms that score with the model (importance, entropy, size)
    score with the served model and ``models - 1`` companions started from the next starters and retrained
    on the same labels each round, as a deployment scores with several backbones (so the importance
    score's inconsistency term is not 0); the served model alone is tested, so random, the oracle and the
    upper bound are the same as with one model.
    """

    name: str
    seeds: Tuple[int, ...]
    arms: Tuple[Tuple[str, str], ...]
    shape: Tuple[int, int, int]
    spacing_scale: float
    grid_mm: Tuple[float, float, float]
    roi: Tuple[int, int, int]
    overlap: float
    num_samples: int
    lr: float
    n_starter: int
    starter_iters: int
    starter_site: str
    n_pool: int
    n_test: int
    hard_fraction: float
    rounds: int
    volumes_per_round: int
    organ_volumes_per_round: int
    organs_per_volume: int
    steps_per_label: int
    labels: str = "atlas25"
    pool: str = "balanced"
    shifted_fraction: float = 0.25  # realistic and organ_local pools: the share not like the starter's own volumes
    replay_starter: bool = False
    starters: int = 1
    models: int = 1  # models scoring the pool: the served one and companions of the next starters
    finetune_lr: Optional[float] = None  # learning rate of the rounds' retraining; None = lr
    # Loss weight of organs not revised in a label: the app's --conf pseudo_weight and its default (1 since
    # 2026-12-05; the runs recorded in bench/RESULTS.md before then used 0).
    pseudo_weight: float = PSEUDO_WEIGHT
    # The organ-level oracle ranks organs by their true error ("error", 1 - Dice) or by how far it is above
    # that organ's mean error over the pool ("excess": what is unusually wrong, not what is hard everywhere).
    oracle_organs: str = "error"
    sites: Tuple[str, ...] = ("A", "B", "C", "D")
    starter_seed: int = 9000
    sw_batch_size: int = 1  # windows per forward pass when inferring and scoring (speed only)

    def __post_init__(self):
        for strategy, revision in self.arms:
            if strategy not in STRATEGIES:
                raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
            if revision not in REVISIONS:
                raise ValueError(f"unknown revision {revision!r}; choose from {', '.join(REVISIONS)}")
            if revision == "organ" and STRATEGIES[strategy][0] not in ORGAN_STRATEGIES:
                raise ValueError("organ-level revision needs an organ priority: use importance or oracle")
        if not 1 <= self.models <= max(1, self.starters):
            raise ValueError(f"models={self.models}: each model needs its own starter; starters={self.starters}")
        if self.oracle_organs not in ORACLE_ORGAN_ERRORS:
            raise ValueError(f"oracle_organs={self.oracle_organs!r}: choose from {', '.join(ORACLE_ORGAN_ERRORS)}")
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; choose from {', '.join(POOLS)}")
        # A whole-volume arm takes a volume out of the pool; an organ-level arm leaves it there for its
        # other organs, so it runs out only when every organ of the pool is revised.
        if any(r == "volume" and s != "all" for s, r in self.arms) and self.volumes_per_round * self.rounds > self.n_pool:
            raise ValueError(f"{self.volumes_per_round * self.rounds} volumes would be revised but the pool holds {self.n_pool}")
        organs, pool_organs = self.organ_volumes_per_round * self.organs_per_volume * self.rounds, self.n_pool * len(LABEL_SETS[self.labels])
        if any(r == "organ" for _, r in self.arms) and organs > pool_organs:
            raise ValueError(f"{organs} organs would be revised but the pool holds {pool_organs}")

    def starter_key(self) -> str:
        """What a starting model depends on (``starter_seed`` included: each distinct starter its own)."""
        d = {k: getattr(self, k) for k in STARTER_FIELDS}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def starter_seed_of(self, seed: int) -> int:
        """The starter seed ``seed`` starts from (``starters`` distinct ones, in turn)."""
        return self.starter_seed + int(seed) % max(1, self.starters)

    def as_dict(self) -> Dict:
        return asdict(self)


# Issue 21's arms: the positive control (oracle) and the upper bound (all), random, the strong naive
# rankings (predicted size, mean entropy), the app's importance at whole-volume and organ level.
BENCHMARK_ARMS = (
    ("oracle", "volume"),
    ("random", "volume"),
    ("size", "volume"),
    ("entropy", "volume"),
    ("importance", "volume"),
    ("calibrated", "volume"),
    ("importance", "organ"),
    ("calibrated", "organ"),
    ("all", "volume"),
)
# What fits the CPU preset's 45 minutes (about 9 minutes an arm over 5 seeds on 2 cores): the positive
# control, random, the strongest simple baseline (mean entropy), the app's calibrated ranking and the
# upper bound. The other arms: --arms (bench/RESULTS.md has them on the same seeds).
SMALL_ARMS = (
    ("oracle", "volume"),
    ("random", "volume"),
    ("entropy", "volume"),
    ("calibrated", "volume"),
    ("all", "volume"),
)


PRESETS: Dict[str, SimConfig] = {
    # The test's: two rounds of every kind of arm, one seed, tiny volumes.
    "tiny": SimConfig(
        name="tiny",
        seeds=(0,),
        arms=(("importance", "volume"), ("random", "volume"), ("importance", "organ"), ("entropy", "volume"),
              ("oracle", "volume"), ("size", "volume"), ("all", "volume")),
        shape=(32, 32, 24),
        spacing_scale=3.0,
        grid_mm=(4.5, 4.5, 7.5),
        roi=(16, 8, 16),
        overlap=0.25,
        num_samples=2,
        sw_batch_size=8,
        lr=3e-3,
        n_starter=2,
        starter_iters=4,
        starter_site="A",
        n_pool=4,
        n_test=2,
        hard_fraction=0.25,
        pool="realistic",
        shifted_fraction=0.5,
        replay_starter=True,
        starters=2,
        models=2,
        rounds=2,
        volumes_per_round=1,
        organ_volumes_per_round=1,
        organs_per_volume=5,
        steps_per_label=1,
    ),
    # The CPU benchmark (the 2-core VM, --jobs 2): a starter that segments (atlas9 on a 3 mm grid; a
    # 32x24x32 window, smaller than the working grid so crops move), three distinct starters over five
    # seeds, 30 test volumes, a realistic pool of 24 and one volume a round, as many rounds as fit the
    # 2-core budget. Starters of 1000 steps and 6 epochs a round over the labelled set: with 600 and 3
    # (attempt 1 in bench/RESULTS.md, issue 21) every arm, the upper bound included, ended within noise
    # of the others, the oracle too; training, not labels, limited the model.
    "small": SimConfig(
        name="small",
        seeds=(0, 1, 2, 3, 4),
        arms=SMALL_ARMS,
        shape=(48, 48, 40),  # working grid 32-44 x 22-31 x 32-48 across the sites
        spacing_scale=2.0,
        grid_mm=(3.0, 3.0, 5.0),
        roi=(32, 24, 32),
        overlap=0.25,
        # Two crops a step and four windows a forward pass: on a CPU, PyTorch runs the 3-D convolutions
        # of one small sample with its own slow kernel and of a batch with oneDNN (3-4x faster here).
        num_samples=2,
        sw_batch_size=4,
        lr=3e-3,
        n_starter=8,
        starter_iters=1000,
        starter_site="A",
        starter_seed=9101,
        starters=3,
        labels="atlas9",
        n_pool=24,
        n_test=30,
        hard_fraction=0.3,
        pool="realistic",
        shifted_fraction=0.25,
        replay_starter=True,
        rounds=5,
        volumes_per_round=1,
        organ_volumes_per_round=2,
        organs_per_volume=3,
        steps_per_label=6,
        finetune_lr=1e-3,
    ),
}


# For one GPU (aimed at 8 minutes on an H100/H200 with --jobs 5; not yet run, sized by the CPU run's cost
# split, bench/RESULTS.md): the small one's phantoms and training with five starters, two models in the
# loop, eight rounds over a pool of 40, and the app's two rankings at whole-volume and organ level.
PRESETS["gpu"] = replace(PRESETS["small"], name="gpu", sw_batch_size=8, starters=5, models=2, n_pool=40, rounds=8,
                         arms=SMALL_ARMS + (("importance", "volume"), ("calibrated", "organ")))
# Larger (documented, hours on one GPU): the recipe's grid and window, all 25 organs.
PRESETS["large"] = replace(PRESETS["small"], name="large", arms=BENCHMARK_ARMS, shape=(128, 128, 96),
                           spacing_scale=1.0, grid_mm=(1.5, 1.5, 1.5), roi=(96, 96, 96), overlap=0.5, sw_batch_size=1,
                           lr=1e-3, finetune_lr=None, starter_iters=1500, starter_seed=9000, starters=5, models=2,
                           labels="atlas25", n_pool=60, rounds=10, organs_per_volume=5, steps_per_label=20)


def get_config(name: str, **overrides) -> SimConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def parse_override(cfg: SimConfig, text: str) -> Dict:
    """``key=value`` -> {key: value typed like the preset's field} (tuples: comma lists)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or key not in cfg.as_dict() or key in ("name", "arms"):
        raise ValueError(f"--set wants key=value with a config field; got {text!r}")
    current = getattr(cfg, key)
    if isinstance(current, tuple):
        kind = type(current[0]) if current else int
        return {key: tuple(kind(v) for v in value.split(","))}
    if isinstance(current, bool):
        return {key: value.lower() in ("1", "true", "yes")}
    if current is None:
        return {key: float(value)}
    return {key: type(current)(value)}


def arm_name(strategy: str, revision: str) -> str:
    return f"{strategy}/{revision}"
