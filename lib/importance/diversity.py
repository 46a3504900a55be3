"""A diverse batch of volumes: class-stratified, noise-diversified picks in the manner of ClaSP PE.

ClaSP PE (Lüth, Traub et al., "Finally outshining the random baseline", TMLR 2026) was the one query
strategy that beat improved random baselines across the 24 settings of the nnActive benchmark. Its two
parts, as used here for whole volumes:

- **class-stratified**: the batch's places go to the classes (here organs) in turn, each taking the
  best pick for *its* score, so a structure the ranking's top ignores (a small organ, a site whose big
  organs are segmented well) still gets picks;
- **power noising with a decaying schedule**: each pick maximises ``log s + T * G`` with ``G`` standard
  Gumbel noise, i.e. volumes are drawn without replacement with probability proportional to
  ``s ** (1 / T)`` (power sampling); ``T`` is large in early rounds (diverse, exploring batches, where
  uncertainty scores are least reliable) and decays by a factor per round (exploiting later).
  ``T = 0``: no noise, the stratified top.

Pure functions of numpy arrays; the caller gives the random generator (deterministic with a seed).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

__all__ = ["diverse_batch", "round_temperature"]

_TINY = 1e-300  # log of a score of 0: such a volume comes after every scored one unless T is enormous


def round_temperature(temperature: float, decay: float, round_index: int) -> float:
    """The schedule: ``temperature * decay ** round_index`` (0 when ``temperature`` is 0)."""
    if temperature <= 0:
        return 0.0
    return float(temperature) * float(decay) ** max(0, int(round_index))


def _keys(scores: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """``log s + T * Gumbel``: the noised keys whose largest are a power sample of ``s ** (1 / T)``."""
    keys = np.log(np.maximum(np.asarray(scores, dtype=np.float64), _TINY))
    if temperature > 0:
        keys = keys + temperature * rng.gumbel(size=keys.shape)
    return keys


def _stratum(scores: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """The noised keys of one stratum's members (``-inf`` for volumes it does not want: score <= 0)."""
    keys = _keys(scores, temperature, rng)
    return np.where(np.asarray(scores) > 0, keys, -np.inf)


def diverse_batch(
    scores: Sequence[float],
    k: int,
    temperature: float,
    rng: np.random.Generator,
    organ_scores: Optional[np.ndarray] = None,
    strata: Optional[Sequence] = None,
) -> List[int]:
    """Indices of ``k`` distinct volumes (all of them, in pick order, when ``k`` >= their number).

    Args:
        scores: ``(N,)`` the volumes' scores (>= 0; larger = more important).
        k: how many to pick.
        temperature: the noise ``T`` (>= 0; 0 = none).
        rng: numpy random generator (the same seed gives the same batch).
        organ_scores: ``(N, C)`` per-organ scores (>= 0): picks are stratified over the organs, each
            organ in turn (in an order drawn from ``rng``, anew each cycle; organs with no positive score
            skipped) taking its best remaining volume by its own noised score.
        strata: ``(N,)`` a group label per volume, used when ``organ_scores`` is not given: the groups
            take turns, each taking its best remaining volume by the noised ``scores``.
        Neither: the noised top-k of ``scores``.

    Ties keep the lower index first. Every pick is removed from every stratum.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = s.size
    k = max(0, min(int(k), n))
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if k == 0:
        return []
    if organ_scores is not None:
        per = np.asarray(organ_scores, dtype=np.float64)
        if per.ndim != 2 or per.shape[0] != n:
            raise ValueError(f"organ_scores must be (N, C) with N = {n}, got {per.shape}")
        columns = [_stratum(per[:, c], temperature, rng) for c in range(per.shape[1]) if (per[:, c] > 0).any()]
    elif strata is not None:
        labels = list(strata)
        if len(labels) != n:
            raise ValueError(f"{len(labels)} strata for {n} volumes")
        keys = _stratum(s, temperature, rng)
        columns = []
        for group in dict.fromkeys(labels):  # first-seen order
            members = np.array([g == group for g in labels])
            columns.append(np.where(members, keys, -np.inf))
    else:
        columns = []
    fallback = _keys(s, temperature, rng)  # for what no stratum wants (and no strata at all)
    picked: List[int] = []
    taken = np.zeros(n, dtype=bool)
    while len(picked) < k:
        progressed = False
        for c in rng.permutation(len(columns)) if columns else []:
            if len(picked) == k:
                break
            column = np.where(taken, -np.inf, columns[c])
            best = int(np.argmax(column))  # the first of equal keys
            if np.isneginf(column[best]):
                continue  # this stratum has nothing left with a score
            picked.append(best)
            taken[best] = True
            progressed = True
        if not progressed:  # strata exhausted: the rest by the volumes' own noised scores
            rest = np.where(taken, -np.inf, fallback)
            for i in np.argsort(-rest, kind="stable")[: k - len(picked)]:
                picked.append(int(i))
            break
    return picked
