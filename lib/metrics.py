"""Per-organ Dice of predicted label maps against the ground truth, on the input grid: the one Dice of
the demo's starter check, the benchmarks and the tests."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


def organ_dice(pred: np.ndarray, gt: np.ndarray, class_indices: Sequence[int]) -> np.ndarray:
    """Dice per class (float, one per class index). NaN where the class is in neither map (nothing to
    score: e.g. a missing organ that the model also left out); 0 where it is in only one."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    out = np.full(len(class_indices), np.nan)
    for k, c in enumerate(class_indices):
        p, g = pred == c, gt == c
        denom = int(p.sum()) + int(g.sum())
        if denom:
            out[k] = 2.0 * int(np.logical_and(p, g).sum()) / denom
    return out


def summarise(per_volume: List[np.ndarray], organs: Sequence[str]) -> Dict[str, float]:
    """Per-organ Dice = mean over the test volumes where it is defined; ``mean`` = mean over organs."""
    table = np.vstack(per_volume)
    with np.errstate(all="ignore"):
        per_organ = np.array([np.nanmean(col) if np.isfinite(col).any() else np.nan for col in table.T])
    finite = per_organ[np.isfinite(per_organ)]
    res = {"mean": float(finite.mean()) if finite.size else float("nan")}
    res.update({o: float(v) for o, v in zip(organs, per_organ)})
    return res
