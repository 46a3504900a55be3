"""Reference importance score: numpy + scipy.ndimage, one organ at a time, written from the formula.

This is the slow, obvious transcription of ``../shared/suprem/README.md`` (the project facts) ("Active learning in
AbdomenAtlas-8K (the importance score)") that the fast torch version in ``attention.py`` is tested
and benchmarked against. It makes the same readings of the text (see ``attention.py``'s docstring):
1-voxel dilation and opening with the 3x3x3 full element, opening = 2 erosions then 2 dilations with
scipy's default border (background), overlap against the *other* overlap organs, each organ's heat
divided by its own maximum and its priority sum taken over ``floor(255 H)`` (the original code's saved
uint8 map), priority ties kept in input order, and the same two options.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage
from scipy.special import entr

from lib.classes import OVERLAP_ORGANS

CUBE = ndimage.generate_binary_structure(3, 3)  # 3x3x3 full, 26-connected


def opening(x: np.ndarray) -> np.ndarray:
    """Binary erosion then binary dilation, 2 iterations each, 3x3x3 full element."""
    eroded = ndimage.binary_erosion(x, structure=CUBE, iterations=2)
    return ndimage.binary_dilation(eroded, structure=CUBE, iterations=2)


def mean_entropy(probs_b: np.ndarray, entropy: str = "positive") -> np.ndarray:
    """probs of one organ, (M, D, H, W) -> mean over models of entr(p) (plus entr(1 - p) when binary)."""
    U = 0
    for p in probs_b:
        e = entr(p)
        if entropy == "binary":
            e = e + entr(1 - p)
        U = U + e
    return U / len(probs_b)


def reference_attention(
    probs: np.ndarray,
    masks: np.ndarray,
    organ_names: Sequence[str],
    model_masks: Optional[np.ndarray] = None,
    entropy: str = "positive",
    normalise_score: bool = False,
    overlap_organs: Sequence[str] = OVERLAP_ORGANS,
) -> Dict[str, object]:
    """probs (M, C, D, H, W), masks (C, D, H, W) bool -> dict of maps (C, D, H, W) and summaries."""
    probs = np.asarray(probs)
    masks = np.asarray(masks, dtype=bool)
    n_models, n_organs = probs.shape[:2]
    if model_masks is None:
        model_masks = probs >= 0.5
    names = list(organ_names)
    others_pool = [i for i, n in enumerate(names) if n in set(overlap_organs)]

    U_b = np.zeros(masks.shape, dtype=bool)
    C_b = np.zeros(masks.shape, dtype=bool)
    O_b = np.zeros(masks.shape, dtype=bool)
    raw_heat = np.zeros(masks.shape, dtype=probs.dtype)

    for b in range(n_organs):
        U = mean_entropy(probs[:, b], entropy)
        U_b[b] = opening(U > 0.05)

        # Inconsistency: population std over models of p_m, zeroed outside dilate1(model m's mask).
        if n_models == 1:
            C = np.zeros(masks.shape[1:], dtype=probs.dtype)
        else:
            kept = []
            for m in range(n_models):
                near = ndimage.binary_dilation(model_masks[m, b], structure=CUBE, iterations=1)
                kept.append(np.where(near, probs[m, b], 0))
            C = np.std(np.stack(kept), axis=0)  # ddof = 0
        C_b[b] = opening(C > 0.1)

        # Overlap: this organ's mask and any other overlap organ's mask.
        any_other = np.zeros(masks.shape[1:], dtype=bool)
        for o in others_pool:
            if o != b:
                any_other |= masks[o]
        O_b[b] = masks[b] & any_other

        raw_heat[b] = U * U_b[b] + C * C_b[b] + O_b[b]

    A_b = U_b | C_b | O_b
    heat = np.zeros_like(raw_heat)
    for b in range(n_organs):  # create_attention.py: each organ's map / its own maximum
        top = raw_heat[b].max() if raw_heat[b].size else 0
        heat[b] = raw_heat[b] / top if top > 0 else raw_heat[b]

    voxels = [int(A_b[b].sum()) for b in range(n_organs)]
    # priority_list sums the saved map, (H * 255).astype(uint8).
    heat_sums = [float(np.floor(heat[b] * 255).sum(dtype=np.float64)) / 255 for b in range(n_organs)]
    if normalise_score:
        region = [int((A_b[b] | masks[b]).sum()) for b in range(n_organs)]
        terms: List[float] = [a / r if r else 0.0 for a, r in zip(voxels, region)]
        score: object = float(sum(terms))
    else:
        terms = [float(a) for a in voxels]
        score = int(sum(voxels))
    priority = sorted(range(n_organs), key=lambda b: (-heat_sums[b], b))
    return {
        "uncertain": U_b,
        "inconsistent": C_b,
        "overlap": O_b,
        "attention": A_b,
        "heat": heat,
        "score": score,
        "attention_voxels": dict(zip(names, voxels)),
        "heat_sums": dict(zip(names, heat_sums)),
        "organ_scores": dict(zip(names, terms)),
        "priority": [names[b] for b in priority],
    }
