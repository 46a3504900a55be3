"""Error capture (issue 15, part 1): does the importance attention point at what the models got wrong?

    .venv/bin/python -m bench.error_capture --config small --models 2 --volumes 100
    .venv/bin/python -m bench.error_capture --config tiny --models 2 --volumes 4 --out /tmp/ec   # smoke run
    .venv/bin/python -m bench.error_capture --config gpu --released DIR --device cuda   # the three backbones

No retraining. A pool of phantom CTs (``testing/phantoms.py``: sites A-D, hard cases; ``--set pool=...`` draws
the loop's pool kinds, ``bench.simulation.data.pool_studies``) with ground truth; ``--models``
SegResNet starters trained on phantoms from different seeds (cached, as bench/simulate.py caches its
starter), so that the inconsistency term exists. Each volume goes through the app's scorer
(``VolumeScorer``: the recipe's pre-processing, each model's sliding-window probabilities, the ensemble's
organ masks, ``compute_attention``), and each (volume, organ) unit gets:

- its true error: voxels where the ensemble's organ mask and the ground truth disagree (working grid), and
  1 - Dice;
- rankings: the attention (the app's organ term of the score, ``organ_scores``) with the reference
  options and with ``entropy binary`` and ``normalise_score``; each term alone (uncertain, inconsistent,
  overlap voxels); beyond the formula, ``raw_uncertain_voxels`` (the uncertainty term without its
  opening); the app's calibrated mode (``--conf importance_mode calibrated``: ``calibrated``, its
  organ term, the expected Dice loss; ``band_uncertainty``, the uncertain mass in the border band it is
  made of); mean binary entropy of the ensemble probability (``lib.importance.epistemic``: the kind of
  uncertainty MONAI Label's epistemic scoring ranks by); predicted organ size; random; the oracle (the
  true error voxels; ``one_minus_dice`` as the oracle of failed units);
- why: where its error voxels lie (inside the organ's attention map, inside the raw uncertainty before
  the opening, or where no model doubts: confident errors), its size and mask surface.

Writes to ``--out``: ``units.csv`` (one row per unit), ``capture.md`` (share of all error voxels in the
top 5 / 10 / 20 % of units per ranking, recall of failed units (organ Dice < 0.5) in the top 10 %,
Spearman correlation with the error, issue 22's error-capture targets MET / NOT MET, the organ each
ranking names first in each volume against the organ that is worst there, and the "why" evidence by
site, hard case and organ), ``capture.png``
(capture curves). Deterministic for a given config, seeds and model count.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch

from bench.simulation.config import get_config, parse_override
from lib.classes import CLASS_INDEX

TOP = (0.05, 0.10, 0.20)
TERMS = ("uncertain", "inconsistent", "overlap")
FAILED_DICE = 0.5  # a unit whose organ Dice is below this has failed
NAIVE = ("predicted_voxels", "mean_entropy")  # the strong naive rankings of issue 21 / 22


class ArchitectureCache:
    """A ``NetworkCache`` for several models of one architecture, named ``<backbone>#<k>``."""

    def __init__(self):
        from lib.networks.inference import NetworkCache

        self._cache = NetworkCache()
        self.loads = 0

    def get(self, name: str, path: str, device, **options):
        """The network of ``name``'s architecture in ``path``; ``options``: ``NetworkCache.get``'s (compile ...)."""
        net = self._cache.get(name.split("#")[0], path, device, **options)
        self.loads = self._cache.loads
        return net


def released_scorer(cfg, weights_dir: str, device: str = "cpu"):
    """The app's VolumeScorer over the released SuPreM files found in ``weights_dir`` (the three backbones
    on a GPU: the ``gpu`` configuration), and their paths."""
    from bench.simulation.loop import labels_of, recipe_of
    from lib.importance.scorer import FixedWeights, VolumeScorer
    from lib.networks import BACKBONES
    from lib.networks.inference import NetworkCache
    from lib.weights import RELEASED_FILES

    weights = {b: os.path.join(weights_dir, RELEASED_FILES[b]) for b in BACKBONES
               if os.path.exists(os.path.join(weights_dir, RELEASED_FILES[b]))}
    if len(weights) < 2:
        raise SystemExit(f"{weights_dir}: found {len(weights)} released SuPreM files; error capture needs at least 2")
    scorer = VolumeScorer(list(weights), FixedWeights(weights), labels_of(cfg), recipe_of(cfg), cache=NetworkCache(),
                          device=device)
    return scorer, list(weights.values())


def seed_scorer(cfg, starters: Sequence[str], device: str = "cpu"):
    """The app's VolumeScorer over the starters (one SegResNet per file) with the config's recipe."""
    from bench.simulation.loop import labels_of, recipe_of
    from lib.importance.scorer import FixedWeights, VolumeScorer

    weights = {f"segresnet#{k}": path for k, path in enumerate(starters)}
    return VolumeScorer(list(weights), FixedWeights(weights), labels_of(cfg), recipe_of(cfg),
                        cache=ArchitectureCache(), device=device)


def working_grid_truth(recipe, image: str, label: str) -> np.ndarray:
    """The ground-truth label map on the scorer's working grid (the recipe's steps, the label nearest)."""
    from monai.transforms import Compose

    from lib.transforms.recipe import labelled_pre_transforms

    data = Compose(labelled_pre_transforms(recipe))({"image": image, "label": label})
    return np.asarray(data["label"][0]).astype(np.int64)


def volume_units(scorer, study, cfg) -> List[Dict]:
    """One row per organ of one volume: true error, every ranking's value, and what explains them."""
    from lib.importance.attention import compute_attention
    from lib.importance.calibrated import compute_calibrated
    from lib.importance.epistemic import binary_entropy
    from lib.transforms.labels import organ_masks

    image = scorer.preprocess(study.image)
    probs = scorer.probabilities(image)
    masks = organ_masks(probs.mean(0), scorer.recipe.threshold)
    results = {
        "attention": compute_attention(probs, masks, scorer.labels),
        "attention_binary": compute_attention(probs, masks, scorer.labels, entropy="binary"),
        "attention_normalised": compute_attention(probs, masks, scorer.labels, normalise_score=True),
        "calibrated": compute_calibrated(probs, masks, scorer.labels, scorer.recipe.spacing),
    }
    truth = working_grid_truth(scorer.recipe, study.image, study.gt)
    if truth.shape != tuple(masks.shape[1:]):
        raise RuntimeError(f"{study.id}: ground truth grid {truth.shape} != working grid {tuple(masks.shape[1:])}")
    maps = why_maps(probs)
    entropy = binary_entropy(probs)
    rows = []
    for c, organ in enumerate(scorer.labels):
        predicted = masks[c].cpu().numpy().astype(bool)
        true = truth == CLASS_INDEX[organ]
        error = np.logical_xor(predicted, true)
        overlap = int(np.logical_and(predicted, true).sum())
        size = int(predicted.sum() + true.sum())
        row = {"volume": study.id, "site": study.site, "hard": study.hard or "", "organ": organ,
               "error_voxels": int(error.sum()), "one_minus_dice": 1.0 - 2.0 * overlap / size if size else 0.0,
               "mean_entropy": float(entropy[c].mean())}
        for name, result in results.items():
            row[name] = float(result.organ_scores.get(organ, 0.0))
        row["band_uncertainty"] = float(results["calibrated"].uncertain_mass[organ])
        row["reference_heat"] = float(results["attention"].heat_sums[organ])  # the reference's organ priority
        for term in TERMS:
            row[term] = int(torch.as_tensor(getattr(results["attention"], term)[c]).sum())
        row.update(why_columns(error, predicted, true, results["attention"].attention[c].cpu().numpy(),
                               {k: v[c] for k, v in maps.items()}))
        rows.append(row)
    return rows


def why_maps(probs) -> Dict[str, np.ndarray]:
    """Per organ (C, ...) bool maps behind the explanations: ``raw_uncertain`` (U > threshold before the
    opening), ``doubted`` (raw uncertainty, or the models disagree: C > its threshold, before opening)."""
    from lib.importance.attention import C_THRESHOLD, U_THRESHOLD, inconsistency, uncertainty

    raw_u = (uncertainty(probs) > U_THRESHOLD).cpu().numpy()
    raw_c = (inconsistency(probs) > C_THRESHOLD).cpu().numpy()
    return {"raw_uncertain": raw_u, "doubted": raw_u | raw_c}


def why_columns(error, predicted, true, attention, maps) -> Dict[str, int]:
    """Where a unit's error voxels lie: inside its attention (A_b), inside the raw uncertainty before the
    opening, or where no model doubts (confident errors); and the unit's size and mask surface."""
    from scipy.ndimage import binary_erosion

    surface = predicted & ~binary_erosion(predicted)
    return {"error_in_attention": int((error & attention.astype(bool)).sum()),
            "error_in_raw_uncertain": int((error & maps["raw_uncertain"]).sum()),
            "confident_error": int((error & ~maps["doubted"]).sum()),
            "raw_uncertain_voxels": int(maps["raw_uncertain"].sum()),
            "true_voxels": int(true.sum()), "predicted_voxels": int(predicted.sum()),
            "surface_voxels": int(surface.sum())}


def capture(values: np.ndarray, error: np.ndarray, share: float) -> float:
    """Share of all error voxels in the top ``share`` of units ranked by ``values`` (ties: expected)."""
    total = error.sum()
    if total == 0:
        return float("nan")
    k = share * len(values)
    order = np.argsort(-values, kind="stable")
    ranked_values, ranked_error = values[order], error[order]
    cut = ranked_values[min(int(np.ceil(k)) - 1, len(values) - 1)] if k >= 1 else np.inf
    above = ranked_values > cut
    tied = ranked_values == cut
    taken = above.sum()
    # Units tied at the cut are taken in a random order: count their mean error for the places left.
    tied_mean = ranked_error[tied].mean() if tied.any() else 0.0
    return float((ranked_error[above].sum() + max(k - taken, 0) * tied_mean) / total)


def capture_table(rows: List[Dict], rankings: Sequence[str]) -> List[Dict]:
    """Per ranking: share of the error voxels in its top 5/10/20 % of units (``top5`` ...), share of the
    failed units (Dice < FAILED_DICE; ``nan`` without ``one_minus_dice`` or without a failed unit) in its
    top 10 % (``failed10``), and its Spearman correlation with the error voxels."""
    from scipy.stats import spearmanr

    error = np.array([r["error_voxels"] for r in rows], float)
    failed = np.array([float(r.get("one_minus_dice", 0.0)) > 1.0 - FAILED_DICE for r in rows], float)
    has_dice = all("one_minus_dice" in r for r in rows)
    out = []
    for name in rankings:
        if name == "random":  # the expected share of a random order, and no correlation
            out.append({"ranking": name, **{f"top{int(s * 100)}": s for s in TOP}, "failed10": 0.10, "spearman": 0.0})
            continue
        values = error if name == "oracle" else np.array([r[name] for r in rows], float)
        entry = {"ranking": name, **{f"top{int(s * 100)}": capture(values, error, s) for s in TOP}}
        entry["failed10"] = capture(values, failed, 0.10) if has_dice else float("nan")
        entry["spearman"] = float(spearmanr(values, error).statistic) if values.std() > 0 else float("nan")
        out.append(entry)
    return out


def targets(table: List[Dict], ranking: str = "calibrated") -> List[Dict]:
    """Issue 22's error-capture targets for ``ranking``: its top 10 % holds >= 1.2x the error voxels of the
    best naive ranking (predicted size, mean entropy) and >= 90 % of the oracle's; its recall of failed
    units in the top 10 % is >= 2x random's. Each: ``{"target", "value", "met"}``."""
    by = {t["ranking"]: t for t in table}
    mine = by[ranking]
    naive = max((by[n] for n in NAIVE if n in by), key=lambda t: t["top10"])
    oracle = by["oracle"]["top10"]
    reachable = "" if not oracle < 1.2 * naive["top10"] else (
        f" (unreachable here: the oracle's {oracle:.1%} is {_ratio(oracle, naive['top10']):.2f}x the naive best)")
    return [
        {"target": f"top 10% by {ranking} hold >= 1.2x the error voxels of the best naive ranking "
                   f"({naive['ranking']}, {naive['top10']:.1%}){reachable}",
         "value": f"{_ratio(mine['top10'], naive['top10']):.2f}x ({mine['top10']:.1%})",
         "met": mine["top10"] >= 1.2 * naive["top10"]},
        {"target": f"top 10% by {ranking} hold >= 90% of the oracle's error voxels ({oracle:.1%})",
         "value": f"{_ratio(mine['top10'], oracle):.0%}", "met": mine["top10"] >= 0.9 * oracle},
        {"target": f"recall of failed units (Dice < {FAILED_DICE}) in the top 10% by {ranking} >= 2x random's (10%)",
         "value": f"{mine['failed10'] / 0.10:.2f}x ({mine['failed10']:.1%})", "met": mine["failed10"] >= 0.20},
    ]


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def first_organs(rows: List[Dict], rankings: Sequence[str]) -> List[str]:
    """How often each organ is named first in its volume by each ranking (the organ the annotator is sent
    to first), against how often it is the volume's worst organ (largest 1 - Dice): do the priorities point
    at what would gain?"""
    volumes = _by(rows, "volume")
    columns = list(rankings) + ["worst (1 - Dice)"]
    counts: Dict[str, Dict[str, int]] = {}
    for units in volumes.values():
        for name in columns:
            key = "one_minus_dice" if name.startswith("worst") else name
            top = max(units, key=lambda r: float(r[key]))
            if float(top[key]) > 0:
                counts.setdefault(top["organ"], {}).setdefault(name, 0)
                counts[top["organ"]][name] += 1
    lines = [f"## Organ named first in each of {len(volumes)} volumes", "",
             "| organ | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for organ in sorted(counts, key=lambda o: -counts[o].get(columns[-1], 0)):
        lines.append(f"| {organ} | " + " | ".join(str(counts[organ].get(c, 0)) for c in columns) + " |")
    return lines + [""]


def curve(values: np.ndarray, error: np.ndarray) -> np.ndarray:
    return np.array([capture(values, error, s) for s in np.linspace(0.01, 1.0, 100)])


def _spearman(rows: List[Dict], a: str, b: str) -> float:
    from scipy.stats import spearmanr

    x, y = np.array([r[a] for r in rows], float), np.array([r[b] for r in rows], float)
    return float(spearmanr(x, y).statistic) if x.std() > 0 and y.std() > 0 else float("nan")


def _by(rows: List[Dict], key: str) -> Dict[str, List[Dict]]:
    groups: Dict[str, List[Dict]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    return groups


def why_lines(rows: List[Dict]) -> List[str]:
    """The evidence for why attention does or does not find the errors (see the module docstring)."""
    error = sum(r["error_voxels"] for r in rows) or 1

    def share(key: str) -> str:
        return f"{sum(r[key] for r in rows) / error:.1%}"

    lines = ["## Why", "",
             f"- Error voxels inside their organ's attention map A_b: {share('error_in_attention')}; inside the raw "
             f"uncertainty (U > threshold, before the opening): {share('error_in_raw_uncertain')}; where no model "
             f"doubts (U and C under their thresholds: confident errors): {share('confident_error')}.",
             f"- Spearman with the error voxels: attention {_spearman(rows, 'attention', 'error_voxels'):.2f}, organ "
             f"size {_spearman(rows, 'true_voxels', 'error_voxels'):.2f}, mask surface "
             f"{_spearman(rows, 'surface_voxels', 'error_voxels'):.2f}. Spearman of attention with size "
             f"{_spearman(rows, 'attention', 'true_voxels'):.2f}, with surface "
             f"{_spearman(rows, 'attention', 'surface_voxels'):.2f}.",
             f"- Within one organ (size held roughly fixed), Spearman with the error voxels: "
             + "; ".join(f"{organ} attention {_spearman(g, 'attention', 'error_voxels'):.2f}, raw uncertainty "
                         f"{_spearman(g, 'raw_uncertain_voxels', 'error_voxels'):.2f}"
                         for organ, g in sorted(_by(rows, "organ").items())) + " (nan: no attention at all).",
             f"- Spearman with 1 - Dice (an error measure that does not grow with size): attention "
             f"{_spearman(rows, 'attention', 'one_minus_dice'):.2f}, raw uncertainty "
             f"{_spearman(rows, 'raw_uncertain_voxels', 'one_minus_dice'):.2f}, mean entropy "
             f"{_spearman(rows, 'mean_entropy', 'one_minus_dice'):.2f}, predicted size "
             f"{_spearman(rows, 'predicted_voxels', 'one_minus_dice'):.2f}.",
             "", "| group | units | share of error voxels | share of attention | mean 1 - Dice |", "|---|---|---|---|---|"]
    attention = sum(r["attention"] for r in rows) or 1.0
    groups: Dict[str, List[Dict]] = {}
    for r in rows:
        groups.setdefault(f"site {r['site']}", []).append(r)
        groups.setdefault(f"hard: {r['hard'] or 'none'}", []).append(r)
        groups.setdefault(f"organ: {r['organ']}", []).append(r)
    for name in sorted(groups):
        g = groups[name]
        lines.append(f"| {name} | {len(g)} | {sum(r['error_voxels'] for r in g) / error:.1%} | "
                     f"{sum(r['attention'] for r in g) / attention:.1%} | "
                     f"{np.mean([r['one_minus_dice'] for r in g]):.2f} |")
    return lines + [""]


def write_outputs(rows: List[Dict], out: str, meta: Dict) -> str:
    rankings = ["attention", "attention_binary", "attention_normalised", *TERMS, "raw_uncertain_voxels",
                "calibrated", "band_uncertainty", "mean_entropy", "predicted_voxels", "random", "oracle",
                "one_minus_dice"]
    table = capture_table(rows, rankings)
    with open(os.path.join(out, "units.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Error capture ({meta['config']})", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [
        "", "| ranking | top 5% | top 10% | top 20% | failed units in top 10% | Spearman |",
        "|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['ranking']} | {t['top5']:.1%} | {t['top10']:.1%} | {t['top20']:.1%} | "
                     f"{t['failed10']:.1%} | {t['spearman']:.2f} |")
    n_failed = sum(float(r["one_minus_dice"]) > 1.0 - FAILED_DICE for r in rows)
    ratio = table[0]["top10"] / 0.10
    lines += ["", f"Failed units (Dice < {FAILED_DICE}): {n_failed} of {len(rows)}.", "",
              f"Target (issue 15): top 10% by attention hold >= 2x random's share: {ratio:.2f}x -> "
              f"**{'met' if ratio >= 2 else 'not met'}**", "", "Targets (issue 22):", ""]
    lines += [f"- {t['target']}: {t['value']} -> **{'MET' if t['met'] else 'NOT MET'}**" for t in targets(table)]
    lines += [""] + first_organs(rows, ["reference_heat", "calibrated", "predicted_voxels"]) + why_lines(rows)
    text = "\n".join(lines)
    with open(os.path.join(out, "capture.md"), "w") as f:
        f.write(text)
    _plot(rows, rankings, os.path.join(out, "capture.png"))
    return text


def _plot(rows: List[Dict], rankings: Sequence[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    error = np.array([r["error_voxels"] for r in rows], float)
    x = np.linspace(0.01, 1.0, 100)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colours = plt.get_cmap("tab20").colors
    for k, name in enumerate(rankings):
        y = x if name == "random" else curve(error if name == "oracle" else np.array([r[name] for r in rows], float), error)
        ax.plot(x * 100, y * 100, label=name, color=colours[(2 * k) % 20 + (2 * k >= 20)],
                lw=2 if name in ("attention", "oracle", "random") else 1, ls="--" if name in ("random", "oracle") else "-")
    ax.set_xlabel("units revised, % (volume x organ, by ranking)")
    ax.set_ylabel("error voxels captured, %")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def starters(cfg, n_models: int, work: str, log, cache: Optional[str] = None) -> List[str]:
    """``n_models`` SegResNet starters (starter_seed, +1, ...), each trained once and cached by its settings
    (the cache bench/simulate.py and bench/starter.py share)."""
    from bench.simulation import loop

    cache = cache or loop.STARTER_CACHE
    return [loop.cached_starter(dataclasses.replace(cfg, starter_seed=cfg.starter_seed + k), work, log, cache)
            for k in range(n_models)]


def _report_only(out: str) -> int:
    with open(os.path.join(out, "units.csv"), newline="") as f:
        rows = [{k: (v if k in ("volume", "site", "hard", "organ") else float(v)) for k, v in r.items()}
                for r in csv.DictReader(f)]
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    print(write_outputs(rows, out, meta))
    return 0


# The config fields a run's record names (with the preset's name: what decides the pool and the starters).
RECORDED_SETTINGS = ("shape", "grid_mm", "roi", "starter_iters", "n_starter", "pool", "shifted_fraction")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="small", help="a bench/simulation/config.py preset (default small)")
    ap.add_argument("--models", type=int, default=2, help="SegResNet starters from different seeds (>= 2)")
    ap.add_argument("--volumes", type=int, default=100, help="phantoms in the pool")
    ap.add_argument("--seed", type=int, default=0, help="the pool's seed")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "error_capture"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--starter-cache", help="where trained starters are kept (default bench/out/starters)")
    ap.add_argument("--released", metavar="DIR",
                    help="score with the released SuPreM files in DIR (the three backbones; GPU) instead of starters")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--report-only", action="store_true", help="only rewrite capture.md/png from OUT/units.csv")
    args = ap.parse_args(argv)
    if args.report_only:
        return _report_only(os.path.abspath(args.out))

    import torch

    from bench.simulation.data import pool_studies

    torch.set_num_threads(max(1, args.threads))
    logging.disable(logging.WARNING)
    cfg = get_config(args.config)
    for item in args.set:
        cfg = dataclasses.replace(cfg, **parse_override(cfg, item))
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f} s] {msg}", flush=True)

    if args.released:
        scorer, models = released_scorer(cfg, args.released, args.device)
    else:
        models = starters(cfg, args.models, os.path.join(out, "work"), log, args.starter_cache)
        scorer = seed_scorer(cfg, models, args.device)
    pool = os.path.join(out, "work", f"pool_{args.seed}")
    studies = pool_studies(os.path.join(pool, "images"), os.path.join(pool, "gt"), args.volumes, args.seed, cfg)
    rows = []
    for i, study in enumerate(studies, 1):
        rows += volume_units(scorer, study, cfg)
        if i % 10 == 0 or i == len(studies):
            log(f"{i}/{len(studies)} volumes scored")
    meta = {"config": cfg.name, "command": "python -m bench.error_capture " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M"), "models": len(models), "volumes": len(studies),
            "units": len(rows), "labels": cfg.labels, "wall_s": round(time.time() - start),
            "model files": ", ".join(os.path.basename(m) for m in models),
            "settings": json.dumps({k: cfg.as_dict()[k] for k in RECORDED_SETTINGS})}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(write_outputs(rows, out, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
