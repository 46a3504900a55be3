"""Outputs of a simulation: ``rounds.csv``, ``dice_vs_annotation.png`` and ``summary.md``.

Target comparisons (issue 5) are read off piecewise-linear curves of test mean Dice against annotation
spent: the annotation an arm needs to reach a Dice ``T`` is where its curve first reaches ``T``,
interpolated linearly between the two rounds around that crossing (None when it never does).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

BASE_COLUMNS = ["seed", "strategy", "revision", "round", "volumes_revised", "organs_revised", "test_mean_dice"]
TAIL_COLUMNS = ["epochs", "labels_used", "score_s", "train_s", "test_s", "picked"]
REF = ("importance", "volume")
RANDOM = ("random", "volume")
ORGAN = ("importance", "organ")


def columns(organs: Sequence[str]) -> List[str]:
    return BASE_COLUMNS + [f"dice_{o}" for o in organs] + TAIL_COLUMNS


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def write_csv(rows: List[Dict], organs: Sequence[str], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns(organs))
        for r in rows:
            d = r["dice"]
            w.writerow([_fmt(v) for v in [r["seed"], r["strategy"], r["revision"], r["round"], r["volumes_revised"],
                                          r["organs_revised"], d["mean"]]]
                       + [_fmt(d.get(o, float("nan"))) for o in organs]
                       + [_fmt(r[c]) for c in TAIL_COLUMNS])


def read_csv(path: str) -> List[Dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- curves -------------------------------------------------------------------------------------------
def curves(rows: Iterable[Dict]) -> Dict[Tuple[str, str], Dict[int, List[Tuple[float, float, float]]]]:
    """(strategy, revision) -> seed -> [(volumes, organs, dice) by round]."""
    out: Dict = defaultdict(lambda: defaultdict(list))
    for r in sorted(rows, key=lambda r: (int(r["seed"]), int(r["round"]))):
        d = r["test_mean_dice"] if "test_mean_dice" in r else r["dice"]["mean"]
        out[(r["strategy"], r["revision"])][int(r["seed"])].append(
            (float(r["volumes_revised"]), float(r["organs_revised"]), float(d)))
    return out


def annotation_to_reach(x: Sequence[float], y: Sequence[float], target: float) -> Optional[float]:
    """Smallest x at which the piecewise-linear curve (x, y) reaches ``target``; None if it never does."""
    for i, (xi, yi) in enumerate(zip(x, y)):
        if yi >= target:
            if i == 0:
                return float(xi)
            x0, y0 = x[i - 1], y[i - 1]
            return float(x0 + (target - y0) * (xi - x0) / (yi - y0))
    return None


def mean_curve(per_seed: Dict[int, List[Tuple[float, float, float]]]) -> np.ndarray:
    """(rounds, 3): mean over seeds of (volumes, organs, dice), and the spread (sd) of dice as column 3."""
    arr = np.array([per_seed[s] for s in sorted(per_seed)], float)  # seeds x rounds x 3
    mean = arr.mean(0)
    sd = arr[:, :, 2].std(0, ddof=1) if arr.shape[0] > 1 else np.zeros(arr.shape[1])
    return np.column_stack([mean, sd])


def _saving(needed: Optional[float], reference: Optional[float]) -> Optional[float]:
    if needed is None or not reference:
        return None
    return 1.0 - needed / reference


def _reach(pts, target, col):
    """Annotation (column ``col`` of the points) needed to reach ``target``; None if never reached.

    0 means the starting model already had that Dice, i.e. nothing was learnt from the revisions."""
    return annotation_to_reach([p[col] for p in pts], [p[2] for p in pts], target)


def target_comparison(rows: List[Dict]) -> Dict:
    """The two numbers of the target, on the mean curves and per seed.

    ``degenerate`` is set (and no saving computed) where random selection ended no better than the
    starting model: then every arm "reaches" the target with no annotation and a saving means nothing.
    """
    c = curves(rows)
    out: Dict = {"volumes": None, "organs": None}
    if RANDOM not in c:
        return out
    rnd_mean = mean_curve(c[RANDOM])
    target = float(rnd_mean[-1, 2])
    start = float(rnd_mean[0, 2])
    v_random = float(rnd_mean[-1, 0])
    res: Dict = {"target_dice": target, "start_dice": start, "degenerate": target <= start}

    def seed_target(s):
        pts = c[RANDOM][s]
        return pts[-1][2], pts[-1][2] <= pts[0][2]

    if REF in c:
        ref = mean_curve(c[REF])
        need = annotation_to_reach(ref[:, 0], ref[:, 2], target)
        per_seed = []
        for s, pts in c[REF].items():
            if s not in c[RANDOM]:
                continue
            t_s, degenerate = seed_target(s)
            n_s = _reach(pts, t_s, 0)
            per_seed.append((s, n_s, None if degenerate else _saving(n_s, c[RANDOM][s][-1][0])))
        out["volumes"] = dict(res, random_volumes=v_random, importance_volumes=need,
                              saving=None if res["degenerate"] else _saving(need, v_random), per_seed=per_seed)
    if ORGAN in c and REF in c:
        ref = mean_curve(c[REF])
        org = mean_curve(c[ORGAN])
        need_whole = annotation_to_reach(ref[:, 1], ref[:, 2], target)
        need_org = annotation_to_reach(org[:, 1], org[:, 2], target)
        per_seed = []
        for s, pts in c[ORGAN].items():
            if s not in c[RANDOM] or s not in c[REF]:
                continue
            t_s, degenerate = seed_target(s)
            w, o = _reach(c[REF][s], t_s, 1), _reach(pts, t_s, 1)
            per_seed.append((s, o, w, None if degenerate else _saving(o, w)))
        deg = res["degenerate"]
        out["organs"] = dict(res, whole_organs=need_whole, organ_level_organs=need_org,
                             random_organs=float(rnd_mean[-1, 1]),
                             saving=None if deg else _saving(need_org, need_whole),
                             saving_vs_random=None if deg else _saving(need_org, float(rnd_mean[-1, 1])),
                             per_seed=per_seed)
    return out


# --- the figure ---------------------------------------------------------------------------------------
def plot(rows: List[Dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = curves(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1))]
    for k, arm in enumerate(sorted(c)):
        m = mean_curve(c[arm])
        label = f"{arm[0]} ({arm[1]} revision)"
        for ax, col in zip(axes, (0, 1)):
            # Distinct dashes, so that arms with identical curves (same picks) stay visible.
            (line,) = ax.plot(m[:, col], m[:, 2], marker="o", ms=3, ls=styles[k % len(styles)], label=label)
            ax.fill_between(m[:, col], m[:, 2] - m[:, 3], m[:, 2] + m[:, 3], color=line.get_color(), alpha=0.15)
    if RANDOM in c:
        target = float(mean_curve(c[RANDOM])[-1, 2])
        for ax in axes:
            ax.axhline(target, color="grey", ls="--", lw=0.8)
        axes[0].annotate("random's final Dice (the target)", (0, target), textcoords="offset points", xytext=(2, 3),
                         fontsize=7, color="grey")
    axes[0].set_xlabel("volumes revised (cumulative)")
    axes[1].set_xlabel("organs revised (cumulative; a whole volume = every organ of the label set)")
    axes[0].set_ylabel("test mean Dice")
    n_seeds = len({int(r["seed"]) for r in rows})
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{title} test Dice vs annotation: mean over {n_seeds} seed(s), band = ±1 sd".strip(), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the summary --------------------------------------------------------------------------------------
def _n(v, fmt="{:.1f}") -> str:
    return "not reached" if v is None else fmt.format(v)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def summary_table(rows: List[Dict]) -> str:
    c = curves(rows)
    n_rounds = max(len(next(iter(v.values()))) for v in c.values())
    head = "| arm | " + " | ".join(f"round {r}" for r in range(n_rounds)) + " | volumes | organs |"
    lines = [head, "|" + "---|" * (n_rounds + 3)]
    for arm in sorted(c):
        m = mean_curve(c[arm])
        cells = [f"{m[r, 2]:.3f} ± {m[r, 3]:.3f}" for r in range(len(m))]
        lines.append(f"| {arm[0]} / {arm[1]} | " + " | ".join(cells) + f" | {m[-1, 0]:.0f} | {m[-1, 1]:.0f} |")
    return "\n".join(lines)


def summary_markdown(rows: List[Dict], meta: Dict) -> str:
    t = target_comparison(rows)
    out = [f"# Active-learning simulation: `{meta.get('config', '?')}`", ""]
    for k in ("command", "machine", "date", "wall_s", "seeds", "starting model", "time spent"):
        if k in meta:
            out.append(f"- {k}: {meta[k]}")
    out += ["", "Test mean Dice (mean ± sd over seeds) after each round; last columns: annotation spent at the end.",
            "", summary_table(rows), ""]
    out += ["## Target", "",
            "Annotation needed to reach a Dice = where the curve (Dice against cumulative annotation, rounds joined "
            "by straight lines) first reaches it. Target Dice = random selection's Dice at the end of its budget.", ""]
    v, o = t.get("volumes"), t.get("organs")
    if (v or o) and (v or o)["degenerate"]:
        x = v or o
        out.append(f"- **No measurable saving**: random selection ended at Dice {x['target_dice']:.3f}, no better than "
                   f"the starting model ({x['start_dice']:.3f}), so every arm 'reaches' the target with no annotation "
                   "and a saving would mean nothing. The revisions did not improve the model at this scale.")
    if v:
        out.append(f"- Volumes: random reaches {v['target_dice']:.3f} with {v['random_volumes']:.0f} revised volumes; "
                   f"importance needs {_n(v['importance_volumes'])} → saving {_pct(v['saving'])} (target ≥ 40%).")
        ps = [f"seed {s}: {_n(n)} ({_pct(sv)})" for s, n, sv in v["per_seed"]]
        reached = [sv for _, _, sv in v["per_seed"] if sv is not None]
        spread = (f"; mean {_pct(float(np.mean(reached)))} ± {100 * float(np.std(reached, ddof=1)):.0f}% over "
                  f"{len(reached)} seeds" if len(reached) > 1 else "")
        out.append(f"  - per seed (each against its own random run; n/a = not reached, or random did not improve "
                   f"on the starting model): {', '.join(ps)}{spread}")
    if o:
        out.append(f"- Organs: to reach {o['target_dice']:.3f}, importance with whole-volume revision needs "
                   f"{_n(o['whole_organs'])} revised organs, importance with organ-level revision needs "
                   f"{_n(o['organ_level_organs'])} → saving {_pct(o['saving'])} (target ≥ 40%); random spent "
                   f"{o['random_organs']:.0f} (saving against it {_pct(o['saving_vs_random'])}).")
        ps = [f"seed {s}: {_n(n)} vs {_n(w)} ({_pct(sv)})" for s, n, w, sv in o["per_seed"]]
        out.append(f"  - per seed (organ-level vs whole-volume): {', '.join(ps)}")
    if not v and not o:
        out.append("- (the arms needed for the target comparison were not run)")
    out.append("")
    return "\n".join(out)
