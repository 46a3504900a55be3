"""The app's ``--conf key value`` settings, parsed in one place with a default for each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from lib.classes import CLASS_INDEX, DEFAULT_LABEL_SET, LABEL_MAPS, LABEL_SETS, label_set
from lib.networks import BACKBONES
from lib.transforms.recipe import AMP_MODES, PRESETS, Recipe

# Fine-tuning defaults, written once: the --conf keys' and the train task's own.
TRAIN_EPOCHS = 50
TRAIN_NUM_SAMPLES = 2  # crops of one image per step
VAL_FRACTION = 0.2
TRAIN_AMP = "bf16"
# Loss weight of the organs nobody revised in a partly revised label (their voxels are the model's own
# pre-annotation): 1 trains every organ of the assembled label, revised over pseudo, as AbdomenAtlas does
# (bench/RESULTS.md, "AbdomenAtlas's assembled labels": what met issue 24's target); 0: no gradient.
PSEUDO_WEIGHT = 1.0

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")


class ConfError(ValueError):
    """A --conf value the app cannot use; the message names the key and the allowed values."""


def _bool(conf: Mapping[str, str], key: str, default: bool) -> bool:
    v = conf.get(key)
    if v is None:
        return default
    v = str(v).strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ConfError(f"--conf {key} {v!r}: expected true or false")


def _choice(conf: Mapping[str, str], key: str, choices, default: Optional[str] = None) -> str:
    v = str(conf.get(key, default or choices[0]))
    if v not in choices:
        raise ConfError(f"--conf {key} {v!r}: choose one of {', '.join(choices)}")
    return v


def _number(conf: Mapping[str, str], key: str, kind, default):
    v = conf.get(key)
    if v is None or str(v) == "":
        return default
    try:
        return kind(v)
    except ValueError:
        raise ConfError(f"--conf {key} {v!r}: expected a {kind.__name__}") from None


def _non_negative(conf: Mapping[str, str], key: str, default: float) -> float:
    v = _number(conf, key, float, default)
    if not v >= 0 or v == float("inf"):
        raise ConfError(f"--conf {key} {conf.get(key)!r}: expected a number >= 0")
    return v


def _fraction(conf: Mapping[str, str], key: str, default: float) -> float:
    v = _number(conf, key, float, default)
    if not 0 <= v <= 1:
        raise ConfError(f"--conf {key} {conf.get(key)!r}: expected a number from 0 to 1")
    return v


@dataclass
class AppConfig:
    models: List[str]
    labels_name: str
    labels: List[str]
    use_pretrained_model: bool
    weights_dir: Optional[str]
    model_dir: Optional[str]
    hf_endpoint: Optional[str]
    preset: str
    recipe: Recipe
    device: Optional[str]
    skip_scoring: bool
    skip_strategies: bool
    skip_trainers: bool
    entropy: str
    normalise_score: bool
    hold_s: float
    state_dir: Optional[str]
    train_roi: Optional[Tuple[int, int, int]]  # None: the recipe's inference window
    train_epochs: int
    train_num_samples: int
    train_label_map: Optional[Dict[int, int]]
    train_amp: str
    val_fraction: float
    round_every_labels: int
    round_interval_s: float
    preprocess_cache: bool = True
    cache_dir: Optional[str] = None
    scoring_engine: str = "inprocess"
    ray_address: Optional[str] = None
    ray_workers: int = 0
    ray_gpus_per_worker: Optional[float] = None
    train_gpus: str = "all"
    pseudo_weight: float = PSEUDO_WEIGHT
    organs_per_sample: int = 0
    importance_mode: str = "calibrated"  # lib.importance.calibrated; "reference": the AbdomenAtlas-8K score
    band_mm: float = 6.0  # calibrated mode: half-width of the border band (mm)
    opening_mm: float = 0.0  # calibrated mode: thinnest uncertain structure kept (mm; 0: no opening)
    diversity_temperature: float = 0.0  # Next Sample's batch noise at round 0 (0: the top of one sorted list)
    diversity_decay: float = 0.5  # the temperature's factor per round done
    # What answers a Next Sample that asks for ``random``: MONAI Label's Random, or, for requests without a
    # client_id, the importance strategy (for OHIF: MONAI Label 0.8.5's OHIF panel asks ``random`` whatever
    # its Strategy list shows, and sends no client_id; 3D Slicer and MONAI Label's client always send one).
    random_strategy: str = "random"


def _label_map(value: Optional[str]) -> Optional[Dict[int, int]]:
    """``--conf train_label_map totalseg|atlas11|suprem`` or ``"src:dst,src:dst"`` -> {source id: SuPreM index}."""
    if not value or value == "suprem":
        return None
    if value in LABEL_MAPS:
        return {src: CLASS_INDEX[name] for src, name in LABEL_MAPS[value].items()}
    try:
        pairs = [p.split(":") for p in value.split(",") if p.strip()]
        return {int(a): int(b) for a, b in pairs}
    except ValueError:
        raise ConfError(
            f"--conf train_label_map {value!r}: use one of {', '.join(LABEL_MAPS)} or 'source:target,...'"
        ) from None


def _window(conf: Mapping[str, str], key: str) -> Optional[Tuple[int, int, int]]:
    """``96`` or ``96,96,64`` -> three voxel counts; absent -> None."""
    value = conf.get(key)
    if value in (None, ""):
        return None
    try:
        size = [int(v) for v in str(value).split(",")]
    except ValueError:
        size = []
    if len(size) not in (1, 3) or min(size, default=0) < 8:
        raise ConfError(f"--conf {key} {value!r}: one size or three comma-separated sizes, each at least 8 voxels")
    return tuple(size * 3 if len(size) == 1 else size)


def parse_conf(conf: Mapping[str, str]) -> AppConfig:
    """Turn MONAI Label's string conf into typed settings; ConfError names any bad key."""
    conf = {k: v for k, v in (conf or {}).items()}
    models_s = str(conf.get("models", "all")).strip()
    if models_s in ("", "all"):
        models = list(BACKBONES)
    else:
        models = [m.strip() for m in models_s.split(",") if m.strip()]
        bad = [m for m in models if m not in BACKBONES]
        if bad:
            raise ConfError(f"--conf models: unknown {', '.join(bad)}; choose from all, {', '.join(BACKBONES)}")
    labels_name = str(conf.get("labels", DEFAULT_LABEL_SET))
    if labels_name not in LABEL_SETS:
        raise ConfError(f"--conf labels {labels_name!r}: choose one of {', '.join(LABEL_SETS)}")
    preset = str(conf.get("preset", "recipe"))
    if preset not in PRESETS:
        raise ConfError(f"--conf preset {preset!r}: choose one of {', '.join(PRESETS)}")
    try:
        recipe = PRESETS[preset].with_overrides(
            overlap=_number(conf, "overlap", float, None),
            sw_batch_size=_number(conf, "sw_batch_size", int, None),
            amp=conf.get("amp") or None,
            tf32=_bool(conf, "tf32", None),  # None: torch's default, as the reference ran
            compile=_bool(conf, "compile", None),
            channels_last=_bool(conf, "channels_last", None),
        )
    except ValueError as e:
        if isinstance(e, ConfError):
            raise
        raise ConfError(f"--conf overlap/sw_batch_size/amp/tf32: {e}") from None
    entropy = str(conf.get("entropy", "positive"))
    if entropy not in ("positive", "binary"):
        raise ConfError(f"--conf entropy {entropy!r}: choose one of positive, binary")
    return AppConfig(
        models=models,
        labels_name=labels_name,
        labels=label_set(labels_name),
        use_pretrained_model=_bool(conf, "use_pretrained_model", True),
        weights_dir=conf.get("weights_dir") or None,
        model_dir=conf.get("model_dir") or None,
        hf_endpoint=conf.get("hf_endpoint") or None,
        preset=preset,
        recipe=recipe,
        device=conf.get("device") or None,
        skip_scoring=_bool(conf, "skip_scoring", False),
        skip_strategies=_bool(conf, "skip_strategies", False),
        skip_trainers=_bool(conf, "skip_trainers", False),
        entropy=entropy,
        normalise_score=_bool(conf, "normalise_score", False),
        hold_s=_number(conf, "hold_s", float, 1800.0),
        state_dir=conf.get("state_dir") or None,
        train_roi=_window(conf, "train_roi"),
        train_epochs=_number(conf, "train_epochs", int, TRAIN_EPOCHS),
        train_num_samples=_number(conf, "train_num_samples", int, TRAIN_NUM_SAMPLES),
        train_label_map=_label_map(conf.get("train_label_map")),
        train_amp=_choice(conf, "train_amp", AMP_MODES, default=TRAIN_AMP),
        val_fraction=_number(conf, "val_fraction", float, VAL_FRACTION),
        round_every_labels=_number(conf, "round_every_labels", int, 0),
        round_interval_s=_number(conf, "round_interval_s", float, 0.0),
        preprocess_cache=_bool(conf, "preprocess_cache", True),
        cache_dir=conf.get("cache_dir") or None,
        scoring_engine=_choice(conf, "scoring_engine", ("inprocess", "ray")),
        ray_address=conf.get("ray_address") or None,
        ray_workers=_number(conf, "ray_workers", int, 0),
        ray_gpus_per_worker=_number(conf, "ray_gpus_per_worker", float, None),
        train_gpus=str(conf.get("train_gpus", "all")),
        pseudo_weight=_number(conf, "pseudo_weight", float, PSEUDO_WEIGHT),  # loss weight of organs nobody revised
        organs_per_sample=_number(conf, "organs_per_sample", int, 0),  # organs Next Sample names (0: all)
        # Calibrated by default: it ranks better in the loop benchmark (bench/RESULTS.md, issues 21, 22, 24).
        importance_mode=_choice(conf, "importance_mode", ("calibrated", "reference")),
        band_mm=_non_negative(conf, "band_mm", 6.0),
        opening_mm=_non_negative(conf, "opening_mm", 0.0),
        diversity_temperature=_non_negative(conf, "diversity_temperature", 0.0),
        diversity_decay=_fraction(conf, "diversity_decay", 0.5),
        random_strategy=_choice(conf, "random_strategy", ("random", "importance")),
    )


def conf_summary(cfg: AppConfig) -> Dict:
    return {
        "models": cfg.models,
        "labels": cfg.labels_name,
        "preset": cfg.preset,
        "recipe": cfg.recipe.as_dict(),
        "train_roi": list(cfg.train_roi or cfg.recipe.roi),
        "use_pretrained_model": cfg.use_pretrained_model,
        "weights_dir": cfg.weights_dir,
        "scoring_engine": cfg.scoring_engine,
        "preprocess_cache": cfg.preprocess_cache,
        "pseudo_weight": cfg.pseudo_weight,
        "organs_per_sample": cfg.organs_per_sample,
        "importance_mode": cfg.importance_mode,
        "diversity_temperature": cfg.diversity_temperature,
        "random_strategy": cfg.random_strategy,
    }
