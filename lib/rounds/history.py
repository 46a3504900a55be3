"""The round history as text tables and PNG plots: mean validation Dice per round, and the organs
revised by annotators per round (organ-level revision)."""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Sequence, Tuple

from lib.files import atomic_path

logger = logging.getLogger(__name__)

Series = Dict[str, List[Tuple[int, float]]]


def backbones_of(entries: Sequence[Dict]) -> List[str]:
    """Backbones that have a mean Dice in any round, in order of first appearance."""
    seen: List[str] = []
    for e in entries:
        for b in (e.get("mean_dice") or {}):
            if b not in seen:
                seen.append(b)
    return seen


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _top(e: Dict) -> str:
    top = e.get("top") or []
    if not top:
        return "-"
    first = top[0]
    if isinstance(first, dict):
        score = first.get("score")
        return f"{first.get('id')} ({score:.3f})" if isinstance(score, (int, float)) else str(first.get("id"))
    return str(first)


def format_table(entries: Sequence[Dict]) -> str:
    """One row per round: round, status, trigger, start, seconds, labels used, mean Dice per backbone,
    images re-scored, top-ranked image, and the error of a failed or interrupted round."""
    backbones = backbones_of(entries)
    header = ["round", "status", "trigger", "started", "seconds", "labels"]
    header += [f"dice {b}" for b in backbones] + ["rescored", "top", "note"]
    rows = [header]
    for e in entries:
        dice = e.get("mean_dice") or {}
        note = e.get("error") or ""
        rows.append(
            [
                _fmt(e.get("round")),
                _fmt(e.get("status")),
                _fmt(e.get("trigger")),
                _fmt(e.get("started_at")),
                _fmt(e.get("seconds"), 1),
                _fmt(e.get("labels_used")),
            ]
            + [_fmt(dice.get(b)) for b in backbones]
            + [_fmt(e.get("rescored")), _top(e), note if len(note) <= 60 else note[:57] + "..."]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not entries:
        lines.append("(no rounds yet)")
    return "\n".join(lines)


def revised_totals(entry: Dict) -> Dict[str, int]:
    """{organ: labelled images with it revised} that a round trained on ({} for rounds before organ records)."""
    return {o: int(n) for o, n in (entry.get("revised_images") or {}).items()}


def format_revisions(entries: Sequence[Dict]) -> str:
    """One row per round that recorded revisions: organ revisions trained on, how many are new since the
    previous such round, and which organs they were."""
    rows = [["round", "revised", "new", "organs revised since the previous round"]]
    last: Dict[str, int] = {}
    for e in entries:
        totals = revised_totals(e)
        if not totals:
            continue
        new = {o: n - last.get(o, 0) for o, n in totals.items() if n > last.get(o, 0)}
        named = ", ".join(f"{o} +{n}" for o, n in sorted(new.items(), key=lambda t: (-t[1], t[0])))
        rows.append([_fmt(e.get("round")), str(sum(totals.values())), str(sum(new.values())), named or "-"])
        last = totals
    if len(rows) == 1:
        return "(no organ revisions recorded)"
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(rows[0][3]))
    return "\n".join(lines)


def revised_series(entries: Sequence[Dict]) -> Series:
    """{"organ revisions": [(round, total revised organ-images), ...]} over rounds that recorded them."""
    points = [(int(e["round"]), float(sum(revised_totals(e).values()))) for e in entries if revised_totals(e)]
    return {"organ revisions": points}


def plot_revised(entries: Sequence[Dict], path: str, plotter: str = "auto") -> str:
    """Write a PNG of the revised organ-images each round trained on; like ``plot_dice``."""
    series = revised_series(entries)
    top = max([v for _, v in series["organ revisions"]] + [1.0])
    axis = {"ylabel": "revised organs (image x organ)", "title": "Organs revised per round", "ymax": top * 1.1}
    with atomic_path(path) as tmp:
        return _plot(series, tmp, plotter, axis)


DICE_AXIS = {"ylabel": "mean validation Dice", "title": "Validation Dice per round", "ymax": 1.0}


def dice_series(entries: Sequence[Dict]) -> Series:
    """{backbone: [(round, mean Dice), ...]} over the rounds that ended with a Dice."""
    series: Series = {b: [] for b in backbones_of(entries)}
    for e in entries:
        for b, v in (e.get("mean_dice") or {}).items():
            if isinstance(v, (int, float)):
                series[b].append((int(e["round"]), float(v)))
    return series


def plot_dice(entries: Sequence[Dict], path: str, plotter: str = "auto") -> str:
    """Write a PNG of mean validation Dice per round, one line per backbone, to ``path``.

    ``plotter``: "matplotlib", "pil" (Pillow only, for installs without matplotlib) or "auto" (the
    first that imports). Returns the plotter used. The file is written whole or not at all.
    """
    series = dice_series(entries)
    with atomic_path(path) as tmp:
        return _plot(series, tmp, plotter, DICE_AXIS)


def _plot(series: Series, path: str, plotter: str, axis: Dict) -> str:
    if plotter in ("auto", "matplotlib"):
        try:
            _plot_matplotlib(series, path, axis)
            return "matplotlib"
        except ImportError:
            if plotter == "matplotlib":
                raise
            logger.info("matplotlib is not installed; drawing the Dice plot with Pillow")
    _plot_pil(series, path, axis)
    return "pil"


def _plot_matplotlib(series: Series, path: str, axis: Dict) -> None:
    # The object API with its own Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for b, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=b)
    if any(series.values()):
        ax.legend(loc="lower right")
        ax.xaxis.get_major_locator().set_params(integer=True)
    else:
        ax.text(0.5, 0.5, "nothing recorded yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("round")
    ax.set_ylabel(axis["ylabel"])
    ax.set_ylim(0, axis["ymax"])
    ax.grid(True, alpha=0.3)
    ax.set_title(axis["title"])
    fig.tight_layout()
    fig.savefig(path, format="png")


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _plot_pil(series: Series, path: str, axis: Dict) -> None:
    from PIL import Image, ImageDraw, ImageFont

    w, h = 700, 400
    left, right, top, bottom = 60, 20, 30, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((left, 8), axis["title"], fill="black", font=font)
    ymax = float(axis["ymax"])
    x0, x1, y0, y1 = left, w - right, h - bottom, top  # y0 is Dice 0, y1 is Dice 1
    d.rectangle([x0, y1, x1, y0], outline="black")
    rounds = sorted({r for points in series.values() for r, _ in points})
    lo, hi = (rounds[0], rounds[-1]) if rounds else (0, 1)
    span = max(hi - lo, 1)

    def xy(r: float, v: float) -> Tuple[float, float]:
        return x0 + 10 + (x1 - x0 - 20) * (r - lo) / span, y0 - (y0 - y1) * max(0.0, min(1.0, v / ymax))

    for i in range(11):
        v = ymax * i / 10
        y = xy(lo, v)[1]
        d.line([x0, y, x0 + 4, y], fill="black")
        if i % 2 == 0:
            d.text((x0 - 30, y - 6), f"{v:.1f}" if ymax <= 1 else f"{v:.0f}", fill="black", font=font)
    for r in rounds:
        x = xy(r, 0)[0]
        d.line([x, y0, x, y0 - 4], fill="black")
        d.text((x - 3, y0 + 6), str(r), fill="black", font=font)
    d.text(((x0 + x1) // 2 - 15, h - 20), "round", fill="black", font=font)
    if not rounds:
        d.text(((x0 + x1) // 2 - 60, (y0 + y1) // 2), "nothing recorded yet", fill="black", font=font)
    for k, (b, points) in enumerate(series.items()):
        colour = _COLOURS[k % len(_COLOURS)]
        pts = [xy(r, v) for r, v in points]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = y1 + 8 + 14 * k
        d.line([x1 - 110, ly + 6, x1 - 90, ly + 6], fill=colour, width=2)
        d.text((x1 - 85, ly), b, fill="black", font=font)
    img.save(path, format="PNG")


def load_entries(target: str) -> Tuple[str, List[Dict]]:
    """``target``: a state folder (its ``rounds.json``) or the log file itself -> (log path, entries)."""
    from lib.rounds.log import RoundLog
    from lib.rounds.manager import LOG_FILE

    path = os.path.join(target, LOG_FILE) if os.path.isdir(target) else target
    return path, RoundLog(path).entries()


def default_png(log_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(log_path)), "rounds_dice.png")
