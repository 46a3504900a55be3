"""Outputs of a simulation: ``rounds.csv``, ``dice_vs_annotation.png`` and ``summary.md``.

Target comparisons (issue 5) are read off piecewise-linear curves of test mean Dice against annotation
spent: the annotation an arm needs to reach a Dice ``T`` is where its curve first reaches ``T``,
interpolated linearly between the two rounds around that crossing (None when it never does).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

BASE_COLUMNS = ["seed", "strategy", "revision", "round", "volumes_revised", "organs_revised", "test_mean_dice"]
TAIL_COLUMNS = ["epochs", "labels_used", "score_s", "train_s", "test_s", "picked", "scored_by"]
VOLUME_COLUMN = "volume_dice"  # JSON: per test volume, per organ Dice (null = undefined), for the intervals
REF = ("importance", "volume")
RANDOM = ("random", "volume")
ORGAN = ("importance", "organ")
ENTROPY = ("entropy", "volume")
ORACLE = ("oracle", "volume")
ALL = ("all", "volume")
# Whole-volume arms compared with random, in this order (the oracle first: the positive control).
CALIBRATED = ("calibrated", "volume")
CALIBRATED_ORGAN = ("calibrated", "organ")
VOLUME_ARMS = (ORACLE, ("size", "volume"), ENTROPY, REF, CALIBRATED, ("importance-binary", "volume"),
               ("first", "volume"))


def columns(organs: Sequence[str]) -> List[str]:
    return BASE_COLUMNS + [f"dice_{o}" for o in organs] + TAIL_COLUMNS + [VOLUME_COLUMN]


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
                       + [_fmt(r[c]) for c in TAIL_COLUMNS] + [_volume_json(d.get("volumes"))])


def _volume_json(table) -> str:
    if not table:
        return ""
    return json.dumps([[None if v is None or math.isnan(v) else round(float(v), 4) for v in vol] for vol in table],
                      separators=(",", ":"))


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


SAVING_TARGET = 0.4  # at least 40% less annotation
SEED_SHARE = 0.8  # the volume target: in at least 4 of 5 seeds


def _arm_against(c, arm, reference, col: int) -> Optional[Dict]:
    """Annotation (``col``: 0 volumes, 1 organs) ``arm`` needs to reach the final Dice of ``reference``,
    against what ``reference`` spent: on the mean curves and per seed (each against its own reference run).

    ``degenerate`` is set (and no saving computed) where the reference ended no better than the starting
    model: then every arm "reaches" its Dice with no annotation and a saving means nothing."""
    if arm not in c or reference not in c:
        return None
    ref = mean_curve(c[reference])
    target, start, spent = float(ref[-1, 2]), float(ref[0, 2]), float(ref[-1, col])
    mine = mean_curve(c[arm])
    need = annotation_to_reach(mine[:, col], mine[:, 2], target)
    degenerate = target <= start
    per_seed = []
    for s, pts in sorted(c[arm].items()):
        if s not in c[reference]:
            continue
        ref_pts = c[reference][s]
        n_s = _reach(pts, ref_pts[-1][2], col)
        seed_degenerate = ref_pts[-1][2] <= ref_pts[0][2]
        per_seed.append((s, n_s, ref_pts[-1][col], None if seed_degenerate else _saving(n_s, ref_pts[-1][col])))
    return {"target_dice": target, "start_dice": start, "degenerate": degenerate, "reference_spent": spent,
            "needed": need, "saving": None if degenerate else _saving(need, spent), "per_seed": per_seed,
            "seeds_met": sum(1 for *_, sv in per_seed if sv is not None and sv >= SAVING_TARGET)}


def target_comparison(rows: List[Dict]) -> Dict:
    """The issues' targets. ``control``: the oracle against random's final Dice, in revised volumes; the
    setup can tell a saving only when it is at least 40% in at least 4 of 5 seeds. ``volumes``: importance
    (whole volume) against random, the same rule. ``organs``: organ-level importance against the
    whole-volume importance arm's final Dice, in revised organs; met when the mean curves show at least
    40% saving. ``entropy``: mean entropy against random (no target). ``strategies``: every whole-volume
    arm against random. ``rises``: random's mean curve never below the starting model's Dice."""
    c = curves(rows)
    out: Dict = {"strategies": {}}
    for arm in VOLUME_ARMS:
        t = _arm_against(c, arm, RANDOM, 0)
        if t is not None:
            n = len(t["per_seed"])
            t["met"] = not t["degenerate"] and n > 0 and t["seeds_met"] >= math.ceil(SEED_SHARE * n)
            out["strategies"][arm] = t
    out["control"] = out["strategies"].get(ORACLE)
    out["volumes"] = out["strategies"].get(REF)
    out["entropy"] = out["strategies"].get(ENTROPY)
    organs = _arm_against(c, ORGAN, REF, 1)
    if organs is not None:
        organs["met"] = organs["saving"] is not None and organs["saving"] >= SAVING_TARGET
    out["organs"] = organs
    if ALL in c:
        m = mean_curve(c[ALL])
        out["all"] = {"volumes": float(m[-1, 0]), "dice": float(m[-1, 2])}
    if RANDOM in c:
        m = mean_curve(c[RANDOM])[:, 2]
        out["rises"] = {"curve": [float(v) for v in m], "met": bool(len(m) > 1 and (m[1:] >= m[0]).all())}
    return out


# --- paired statistics against a reference arm --------------------------------------------------------
def seed_tables(rows: Iterable[Dict]) -> Dict[Tuple[str, str], Dict[int, List]]:
    """(strategy, revision) -> seed -> [(volumes, organs, per-volume Dice table)] by round."""
    out: Dict = defaultdict(lambda: defaultdict(list))
    for r in sorted(rows, key=lambda r: (int(r["seed"]), int(r["round"]))):
        out[(r["strategy"], r["revision"])][int(r["seed"])].append(
            (float(r["volumes_revised"]), float(r["organs_revised"]), volume_table(r)))
    return out


NOT_REACHED = -1.0  # the saving recorded when an arm never reaches the reference's final Dice (<= -100%)


def _saving_on(x_arm, y_arm, x_ref, y_ref) -> float:
    need = annotation_to_reach(x_arm, y_arm, y_ref[-1])
    if not x_ref[-1]:
        return float("nan")
    return NOT_REACHED if need is None else 1.0 - need / x_ref[-1]


def paired_bootstrap(rows: List[Dict], arm, reference, col: int = 0, n: int = 1000, seed: int = 0,
                     level: float = 0.95) -> Optional[Dict]:
    """Saving of ``arm`` against ``reference`` (annotation in column ``col``: 0 volumes, 1 organs, needed
    to reach the reference's final Dice on the mean curves) and the final Dice difference (arm minus
    reference), each with a paired bootstrap interval: resample seeds and, within a seed, its test
    volumes, the same draw for both arms (they are tested on the same volumes). None without the
    per-volume tables. An arm that never reaches counts as NOT_REACHED."""
    t = seed_tables(rows)
    if arm not in t or reference not in t:
        return None
    seeds = sorted(set(t[arm]) & set(t[reference]))
    pairs = [(t[arm][s], t[reference][s]) for s in seeds]
    if not pairs or any(tab is None for a, r in pairs for *_, tab in a + r):
        return None
    rng = np.random.default_rng(seed)

    def stats(draw_seeds, draws):
        arm_y = np.mean([[_mean_dice(tab[v]) for *_, tab in pairs[i][0]] for i, v in zip(draw_seeds, draws)], 0)
        ref_y = np.mean([[_mean_dice(tab[v]) for *_, tab in pairs[i][1]] for i, v in zip(draw_seeds, draws)], 0)
        x_arm = [p[col] for p in pairs[0][0]]
        x_ref = [p[col] for p in pairs[0][1]]
        return _saving_on(x_arm, arm_y, x_ref, ref_y), float(arm_y[-1] - ref_y[-1])

    k = len(pairs)
    n_test = [len(pairs[i][0][0][2]) for i in range(k)]
    point = stats(range(k), [np.arange(n_test[i]) for i in range(k)])
    boot = np.empty((n, 2))
    for b in range(n):
        idx = rng.integers(0, k, size=k)
        boot[b] = stats(idx, [rng.integers(0, n_test[i], size=n_test[i]) for i in idx])
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    (s_lo, d_lo), (s_hi, d_hi) = np.nanpercentile(boot, q, axis=0)
    return {"saving": point[0], "saving_ci": (float(s_lo), float(s_hi)),
            "delta_final": point[1], "delta_ci": (float(d_lo), float(d_hi)), "seeds": seeds}


# --- bootstrap intervals ------------------------------------------------------------------------------
def volume_table(row: Dict) -> Optional[np.ndarray]:
    """The per-test-volume, per-organ Dice of a row (volumes x organs, NaN where undefined), or None."""
    if "dice" in row and isinstance(row["dice"], dict):
        table = row["dice"].get("volumes")
    else:
        text = row.get("volume_dice") or ""
        table = json.loads(text) if text else None
    if not table:
        return None
    return np.array([[np.nan if v is None else v for v in vol] for vol in table], float)


def _mean_dice(table: np.ndarray) -> float:
    """``dice.summarise``'s mean: per organ the mean over volumes, then the mean over organs."""
    with np.errstate(all="ignore"):
        per_organ = np.nanmean(table, axis=0) if table.size else np.array([])
    per_organ = per_organ[np.isfinite(per_organ)]
    return float(per_organ.mean()) if per_organ.size else float("nan")


def bootstrap_interval(tables: Sequence[np.ndarray], rng: np.random.Generator, n: int = 2000,
                       level: float = 0.95) -> Tuple[float, float]:
    """Percentile interval of the mean over seeds of the test mean Dice, resampling seeds and, within
    each seed, its test volumes (both with replacement): the two sources of spread."""
    stats = np.empty(n)
    k = len(tables)
    for b in range(n):
        seeds = rng.integers(0, k, size=k)
        stats[b] = np.nanmean([_mean_dice(tables[i][rng.integers(0, len(tables[i]), size=len(tables[i]))])
                               for i in seeds])
    lo, hi = np.nanpercentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def bands(rows: Iterable[Dict], seed: int = 0) -> Dict[Tuple[str, str], List[Tuple[float, float]]]:
    """(strategy, revision) -> per round the bootstrap 95% interval of the test mean Dice (NaN if a row
    has no per-volume table)."""
    tables: Dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        tables[(r["strategy"], r["revision"])][int(r["round"])].append(volume_table(r))
    rng = np.random.default_rng(seed)
    out = {}
    for arm, by_round in tables.items():
        out[arm] = [bootstrap_interval(t, rng) if all(x is not None for x in t) else (float("nan"),) * 2
                    for _, t in sorted(by_round.items())]
    return out


# --- the figure ---------------------------------------------------------------------------------------
def plot(rows: List[Dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = curves(rows)
    intervals = bands(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    styles = ["-", "--", ":", "-.", (0, (5, 1, 1, 1))]
    for k, arm in enumerate(sorted(c)):
        m = mean_curve(c[arm])
        lo, hi = np.array(intervals[arm]).T
        label = f"{arm[0]} ({arm[1]} revision)"
        for ax, col in zip(axes, (0, 1)):
            # Distinct dashes, so that arms with identical curves (same picks) stay visible.
            (line,) = ax.plot(m[:, col], m[:, 2], marker="o", ms=3, ls=styles[k % len(styles)], label=label)
            ax.fill_between(m[:, col], lo, hi, color=line.get_color(), alpha=0.12)
    if RANDOM in c:
        target = float(mean_curve(c[RANDOM])[-1, 2])
        axes[0].axhline(target, color="grey", ls="--", lw=0.8)
        axes[0].annotate("random's final Dice", (0, target), textcoords="offset points", xytext=(2, 3),
                         fontsize=7, color="grey")
    if REF in c:
        target = float(mean_curve(c[REF])[-1, 2])
        axes[1].axhline(target, color="grey", ls="--", lw=0.8)
        axes[1].annotate("whole-volume importance's final Dice", (0, target), textcoords="offset points",
                         xytext=(2, 3), fontsize=7, color="grey")
    axes[0].set_xlabel("volumes revised (cumulative)")
    axes[1].set_xlabel("organs revised (cumulative; a whole volume = every organ of the label set)")
    axes[0].set_ylabel("test mean Dice")
    n_seeds = len({int(r["seed"]) for r in rows})
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{title} test Dice vs annotation: mean over {n_seeds} seed(s), band = bootstrap 95% interval "
                 "(seeds and test volumes)".strip(), fontsize=10)
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
    intervals = bands(rows)
    n_rounds = max(len(next(iter(v.values()))) for v in c.values())
    head = "| arm | " + " | ".join(f"round {r}" for r in range(n_rounds)) + " | volumes | organs |"
    lines = [head, "|" + "---|" * (n_rounds + 3)]
    for arm in sorted(c):
        m = mean_curve(c[arm])
        cells = [f"{m[r, 2]:.3f} [{lo:.3f}, {hi:.3f}]" for r, (lo, hi) in enumerate(intervals[arm])]
        lines.append(f"| {arm[0]} / {arm[1]} | " + " | ".join(cells) + f" | {m[-1, 0]:.0f} | {m[-1, 1]:.0f} |")
    return "\n".join(lines)


def _verdict(t: Dict) -> str:
    return "**met**" if t.get("met") else "**not met**"


def _per_seed(t: Dict, unit: str) -> str:
    cells = [f"seed {s}: {_n(n)} of {ref:.0f} ({_pct(sv)})" for s, n, ref, sv in t["per_seed"]]
    return f"  - per seed ({unit} needed of the reference's, saving; n/a = not reached or nothing learnt): " + ", ".join(cells)


def _arm_label(arm) -> str:
    return f"{arm[0]} / {arm[1]}"


def _ci(v: Optional[Tuple[float, float]], pct: bool = False) -> str:
    if v is None:
        return ""
    return f" [{_pct(v[0])}, {_pct(v[1])}]" if pct else f" [{v[0]:+.3f}, {v[1]:+.3f}]"


def _control_lines(t: Dict, paired: Dict) -> List[str]:
    out = []
    ctl = t.get("control")
    if ctl:
        p = paired.get(ORACLE) or {}
        out.append(f"- Positive control ({_verdict(ctl)}; the setup can tell a saving when the oracle reaches random's "
                   f"final Dice with >= 40% fewer volumes in >= 4 of 5 seeds): oracle needs {_n(ctl['needed'])} of "
                   f"{ctl['reference_spent']:.0f} volumes on the mean curve -> saving {_pct(ctl['saving'])}"
                   f"{_ci(p.get('saving_ci'), True)}; >= 40% in {ctl['seeds_met']} of {len(ctl['per_seed'])} seeds.")
        out.append(_per_seed(ctl, "volumes"))
        if not ctl["met"]:
            out.append("- **The setup cannot tell a saving** (the oracle does not pass): the strategy comparisons "
                       "below are not results.")
    else:
        out.append("- Positive control: **not run** (no oracle arm): nothing shows this setup can tell a saving.")
    bound = t.get("all")
    if bound:
        out.append(f"- Upper bound (every pool volume revised, {bound['volumes']:.0f}): test Dice {bound['dice']:.3f}.")
    rises = t.get("rises")
    if rises:
        out.append(f"- Random's curve rises with labels ({'**met**' if rises['met'] else '**not met**'}; no round "
                   f"below the starting model on the mean curve): " + " -> ".join(f"{v:.3f}" for v in rises["curve"]))
    return out


def _strategy_table(t: Dict, paired: Dict) -> List[str]:
    """One row per whole-volume arm: its saving against random with the paired interval, and the final
    Dice difference."""
    if not t.get("strategies"):
        return []
    out = ["", "| arm against random | volumes needed | saving (mean curves) [paired 95%] | seeds >= 40% | "
           "final Dice minus random's [paired 95%] | >= 40% in >= 4 of 5 seeds |", "|---|---|---|---|---|---|"]
    for arm, a in t["strategies"].items():
        p = paired.get(arm) or {}
        delta = p.get("delta_final")
        # The paired estimate (seeds both arms ran) when there is one, so that it sits inside its interval.
        saving = p["saving"] if "saving" in p else a["saving"]
        saving = None if saving is None or saving == NOT_REACHED else saving
        out.append(f"| {_arm_label(arm)} | {_n(a['needed'])} of {a['reference_spent']:.0f} | {_pct(saving)}"
                   f"{_ci(p.get('saving_ci'), True)} | {a['seeds_met']} of {len(a['per_seed'])} | "
                   f"{'n/a' if delta is None else f'{delta:+.3f}'}{_ci(p.get('delta_ci'))} | "
                   f"{'MET' if a['met'] else 'NOT MET'} |")
    out.append(f"\nA saving of {_pct(NOT_REACHED)} in an interval stands for 'never reaches random's final Dice'.")
    return out


def _target_lines(t: Dict, paired: Optional[Dict] = None) -> List[str]:
    paired = paired or {}
    out = _control_lines(t, paired)
    v, o, e = t.get("volumes"), t.get("organs"), t.get("entropy")
    if v:
        if v["degenerate"]:
            out.append(f"- **No measurable saving**: random selection ended at Dice {v['target_dice']:.3f}, no better "
                       f"than the starting model ({v['start_dice']:.3f}); every arm 'reaches' it with no annotation.")
        out.append(f"- Volumes ({_verdict(v)}; target: >= 40% fewer in >= 4 of 5 seeds): random reaches "
                   f"{v['target_dice']:.3f} with {v['reference_spent']:.0f} revised volumes; importance (whole volume) "
                   f"needs {_n(v['needed'])} on the mean curve -> saving {_pct(v['saving'])}; >= 40% in "
                   f"{v['seeds_met']} of {len(v['per_seed'])} seeds.")
        out.append(_per_seed(v, "volumes"))
    if o:
        p = paired.get(ORGAN) or {}
        out.append(f"- Organs ({_verdict(o)}; target: >= 40% fewer): whole-volume importance reaches "
                   f"{o['target_dice']:.3f} with {o['reference_spent']:.0f} revised organs; organ-level importance "
                   f"needs {_n(o['needed'])} on the mean curve -> saving {_pct(o['saving'])}{_ci(p.get('saving_ci'), True)}.")
        out.append(_per_seed(o, "organs"))
    if e:
        out.append(f"- Mean entropy (no target): needs {_n(e['needed'])} volumes to reach random's final Dice "
                   f"-> saving {_pct(e['saving'])}; >= 40% in {e['seeds_met']} of {len(e['per_seed'])} seeds.")
    return (out or ["- (the arms needed for the target comparison were not run)"]) + _strategy_table(t, paired)


def revised_organs(picked: str) -> List[str]:
    """Organs named in a round's ``picked`` column (``id:site:hard[organ|organ]`` items)."""
    out = []
    for item in picked.split():
        if "[" in item:
            out += [o for o in item[item.index("[") + 1: item.rindex("]")].split("|") if o]
    return out


def _organs(rows: List[Dict]) -> List[str]:
    """The organs of the rows' per-organ Dice columns (``dice_<organ>``, as rounds.csv has them)."""
    return [k[len("dice_"):] for k in (rows[0] if rows else {}) if k.startswith("dice_")]


def organ_drift(rows: List[Dict], organs: Sequence[str]) -> Dict[Tuple[str, str], Dict]:
    """Organ-level arms: mean Dice (over seeds) of the organs revised at least once by the end, and of
    those never revised, at the start and after the last round; which organs were handed out how often.
    Unrevised organs learn only through the pseudo labels' weight and shared features: they must not drift."""
    out = {}
    for arm in dict.fromkeys((r["strategy"], r["revision"]) for r in rows if r["revision"] == "organ"):
        counts: Dict[str, int] = defaultdict(int)
        rev_start, rev_end, un_start, un_end = [], [], [], []
        for seed_rows in _arm_seeds(rows, arm).values():
            named = [o for r in seed_rows for o in revised_organs(r.get("picked", ""))]
            for o in named:
                counts[o] += 1
            first, last = seed_rows[0], seed_rows[-1]
            for o in organs:
                a, b = first.get(f"dice_{o}", ""), last.get(f"dice_{o}", "")
                if a == "" or b == "":
                    continue
                (rev_start if o in named else un_start).append(float(a))
                (rev_end if o in named else un_end).append(float(b))
        mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
        out[arm] = {"revised": (mean(rev_start), mean(rev_end)), "unrevised": (mean(un_start), mean(un_end)),
                    "handed_out": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}
    return out


def unrevised_change(rows: List[Dict], arm, n: int = 1000, seed: int = 0,
                     level: float = 0.95) -> Optional[Tuple[float, Tuple[float, float]]]:
    """Change of the never-revised organs' mean test Dice from the start to the last round of an
    organ-level arm (per seed its own never-revised organs), with a bootstrap interval over seeds and,
    within a seed, its test volumes (the same draw for start and end). None without the tables."""
    organs = _organs(rows)
    pairs = []
    for seed_rows in _arm_seeds(rows, arm).values():
        named = {o for r in seed_rows for o in revised_organs(r.get("picked", ""))}
        cols = [i for i, o in enumerate(organs) if o not in named]
        first, last = volume_table(seed_rows[0]), volume_table(seed_rows[-1])
        if first is None or last is None:
            return None
        if cols:  # a seed that revised every organ has none to drift
            pairs.append((first[:, cols], last[:, cols]))
    if not pairs:
        return None

    def change(idx, draws):
        return float(np.mean([_mean_dice(pairs[i][1][v]) - _mean_dice(pairs[i][0][v]) for i, v in zip(idx, draws)]))

    rng = np.random.default_rng(seed)
    k = len(pairs)
    point = change(range(k), [np.arange(len(p[0])) for p in pairs])
    boot = []
    for _ in range(n):
        idx = rng.integers(0, k, size=k)
        boot.append(change(idx, [rng.integers(0, len(pairs[i][0]), size=len(pairs[i][0])) for i in idx]))
    lo, hi = np.nanpercentile(boot, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return point, (float(lo), float(hi))


def _arm_seeds(rows: List[Dict], arm) -> Dict[int, List[Dict]]:
    """seed -> the arm's rows in round order."""
    out: Dict[int, List[Dict]] = defaultdict(list)
    for r in rows:
        if (r["strategy"], r["revision"]) == tuple(arm):
            out[int(r["seed"])].append(r)
    return {s: sorted(v, key=lambda r: int(r["round"])) for s, v in out.items()}


def revised_by_round(rows: List[Dict], arm) -> List[Tuple[int, float, float]]:
    """(round, mean Dice of the organs revised by then, of those not yet revised): means over seeds of
    the per-seed organ means (an organ counts as revised from the round its revision was trained on)."""
    organs = _organs(rows)
    by_round: Dict[int, Tuple[List[float], List[float]]] = defaultdict(lambda: ([], []))
    for seed_rows in _arm_seeds(rows, arm).values():
        named: set = set()
        for r in seed_rows:
            named |= set(revised_organs(r.get("picked", "")))
            values = {o: float(r[f"dice_{o}"]) for o in organs if r.get(f"dice_{o}", "") != ""}
            rev = [v for o, v in values.items() if o in named]
            unrev = [v for o, v in values.items() if o not in named]
            by_round[int(r["round"])][0].append(float(np.mean(rev)) if rev else float("nan"))
            by_round[int(r["round"])][1].append(float(np.mean(unrev)) if unrev else float("nan"))
    return [(k, float(np.nanmean(a)) if np.isfinite(a).any() else float("nan"), float(np.nanmean(u)))
            for k, (a, u) in sorted(by_round.items()) for a, u in [(np.array(a), np.array(u))]]


def organ_gains(rows: List[Dict], arms: Sequence) -> List[str]:
    """A table: per organ, how often each organ-level arm handed it out and its Dice gain there (last round
    minus start, mean over seeds), beside its gain under whole-volume random revision (what labels of
    that organ bring when every organ is revised)."""
    organs = _organs(rows)
    columns = [a for a in arms if _arm_seeds(rows, a)]
    head = "| organ | start | " + " | ".join(f"{_arm_label(a)}: handed out, gain" for a in columns) + " |"
    out = [head, "|" + "---|" * (2 + len(columns))]
    for o in organs:
        cells, start = [], float("nan")
        for a in columns:
            seeds = _arm_seeds(rows, a).values()
            handed = sum(revised_organs(r.get("picked", "")).count(o) for v in seeds for r in v)
            pairs = [(float(v[0][f"dice_{o}"]), float(v[-1][f"dice_{o}"])) for v in seeds
                     if v[0].get(f"dice_{o}", "") != "" and v[-1].get(f"dice_{o}", "") != ""]
            start = float(np.mean([p[0] for p in pairs])) if pairs else start
            gain = float(np.mean([b - a for a, b in pairs])) if pairs else float("nan")
            cells.append(f"{handed if a[1] == 'organ' else '-'}, {gain:+.3f}")
        out.append(f"| {o} | {start:.3f} | " + " | ".join(cells) + " |")
    return out


def _drift_lines(rows: List[Dict]) -> List[str]:
    organs = _organs(rows)
    out = []
    drift = organ_drift(rows, organs)
    for arm, d in drift.items():
        (rs, re_), (us, ue) = d["revised"], d["unrevised"]
        change = unrevised_change(rows, arm)
        ci = f" (change {change[0]:+.3f}, paired 95% [{change[1][0]:+.3f}, {change[1][1]:+.3f}])" if change else ""
        out.append(f"- {_arm_label(arm)}: organs revised at least once: Dice {rs:.3f} -> {re_:.3f}; never revised: "
                   f"{us:.3f} -> {ue:.3f}{ci} (mean over seeds and organs, start -> last round); handed out: "
                   + ", ".join(f"{o} {n}" for o, n in d["handed_out"].items()))
        out.append("  by round (revised by then / not yet revised): " + "; ".join(
            f"{k}: {a:.3f} / {u:.3f}" for k, a, u in revised_by_round(rows, arm)))
    if out:
        arms = list(drift) + [RANDOM]
        out += ["", "Organs handed out against organs that gained (Dice, last round minus start, mean over seeds):",
                ""] + organ_gains(rows, arms)
    return out


def paired_comparisons(rows: List[Dict], n: int = 1000) -> Dict:
    """Paired bootstrap of every whole-volume arm against random (volumes), and of organ-level importance
    against whole-volume importance (organs)."""
    out = {arm: paired_bootstrap(rows, arm, RANDOM, 0, n) for arm in VOLUME_ARMS}
    out[ORGAN] = paired_bootstrap(rows, ORGAN, REF, 1, n)
    out[CALIBRATED_ORGAN] = paired_bootstrap(rows, CALIBRATED_ORGAN, CALIBRATED, 1, n)
    return {k: v for k, v in out.items() if v is not None}


def _scored_by_lines(rows: List[Dict]) -> List[str]:
    """How many models scored each scored arm's picks (a deployment scores with several)."""
    counts = defaultdict(set)
    for r in rows:
        if int(r["round"]) > 0 and str(r.get("scored_by") or "0") != "0":
            counts[f"{r['strategy']} / {r['revision']}"].add(int(r["scored_by"]))
    return [f"- models scoring the pool: {arm} {', '.join(map(str, sorted(n)))}" for arm, n in sorted(counts.items())]


def summary_markdown(rows: List[Dict], meta: Dict) -> str:
    out = [f"# Active-learning simulation: `{meta.get('config', '?')}`", ""]
    for k in ("command", "machine", "date", "wall_s", "seeds", "starting model", "time spent"):
        if k in meta:
            out.append(f"- {k}: {meta[k]}")
    out += _scored_by_lines(rows)
    out += ["", "Test mean Dice after each round: mean over seeds [bootstrap 95% interval, resampling seeds and "
            "test volumes]; last columns: annotation spent at the end.", "", summary_table(rows), ""]
    out += ["## Targets", "",
            "Annotation needed to reach a Dice = where the curve (Dice against cumulative annotation, rounds joined "
            "by straight lines) first reaches it.", ""]
    out += _target_lines(target_comparison(rows), paired_comparisons(rows))
    drift = _drift_lines(rows)
    if drift:
        out += ["", "## Organ-level revision: revised and unrevised organs", ""] + drift
    out.append("")
    return "\n".join(out)
