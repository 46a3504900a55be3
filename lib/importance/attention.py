"""Attention maps and the importance score of AbdomenAtlas-8K active learning, in torch.

Formula: ``../shared/suprem/README.md`` (the project facts), section "Active learning in AbdomenAtlas-8K (the
importance score)". Pure functions on tensors (CPU or CUDA): no files, no server.

Per organ ``b`` (inputs: per-model sigmoid probabilities ``p_m``, m = 1..M, and the ensemble masks):

- uncertainty ``U = mean_m entr(p_m)``, ``entr(p) = -p ln p`` (0 at p = 0); ``U_b = opening(U > 0.05)``.
- inconsistency ``C = std_m(p_m * dilate1(mask_m))`` (population std, ddof 0); ``C_b = opening(C > 0.1)``;
  ``C = 0`` when M = 1.
- overlap ``O_b = mask_b AND (OR of mask_o over the overlap organs o != b)``.
- ``A_b = U_b | C_b | O_b``; heat ``H = (U * U_b + C * C_b + O_b) / max(...)``.
- score = sum over organs of ``|A_b|``; organ priority = organs by descending ``sum(H)``.

Readings of the text where it leaves room (``attention_reference.py``, the plain numpy + scipy
transcription this is tested against, makes the same ones):

- "opening": binary erosion then binary dilation, 2 iterations each, 3x3x3 full (26-connected)
  structuring element, outside the volume = background (scipy.ndimage's ``border_value=0``). Two
  iterations of the 3x3x3 cube equal one pass of the 5x5x5 cube, so a voxel closer than 2 voxels to
  the volume border never survives the erosion.
- "1-voxel dilation of that model's organ mask": the README names no element for it; we use one
  dilation with the same 3x3x3 full (26-connected) element the opening uses.
- "that model's organ mask": ``model_masks[m]``; when not given, ``probs[m] >= 0.5``.
- overlap: every organ ``b`` passed in (vessels too) gets an ``O_b``; the *other* organs it is
  checked against are only the overlap organs (``lib.classes.OVERLAP_ORGANS``, the 20 non-vessel
  organs) among those passed in, excluding ``b`` itself.
- "/ max": one maximum over the whole volume (all organs, all voxels), so per-organ heat sums stay
  comparable and the priority order is that of the un-normalised sums. If the maximum is 0, the
  heat is all zeros (no division).
- priority ties (equal heat sums, e.g. organs with no attention) keep the input order.

Options beside the reference (defaults = reference):

- ``entropy="binary"``: ``entr(p) + entr(1 - p)`` (the full Bernoulli entropy, maximum ln 2) instead of
  the positive term only. It is >= the positive-term map everywhere.
- ``normalise_score=True``: each organ contributes ``|A_b| / |A_b OR mask_b|`` (the attention's share
  of the region the annotator looks at for that organ: its mask plus its attention), in [0, 1];
  an organ with neither mask nor attention contributes 0. The score is then a float in
  [0, number of organs] and no longer favours big organs or big volumes. Dividing by ``|mask_b|``
  alone was not chosen because it is undefined (or explodes) for organs the ensemble missed,
  which are exactly the ones that need attention.

Speed (the CPU numbers were measured on the 2-core machine this was written on):

- Morphology: OR/AND of shifted slices of 0/1 uint8 tensors, one axis at a time (the 3x3x3 cube is
  the product of three 3-voxel lines; 2 iterations = the 5x5x5 cube), batched over organs and
  models. uint8 OR ran ~7x faster than bool OR, and the slice approach ~17x faster than
  ``max_pool3d`` (float32, float16 and bfloat16 alike; slower than scipy there).
- Masks become floats by a uint8 -> float copy and a multiply (~4x faster than ``torch.where`` /
  ``masked_fill``); zeros and subnormal numbers are kept out of ``log`` and ``sqrt`` (10-25x slower
  on them; see ``_plogp_`` and ``_inconsistency_into``: no output changes).
- Work buffers are allocated once and reused (fresh large allocations cost page faults).
- CPU default (``crop=True``): organ by organ, on the bounding box of where that organ can have
  attention (``_active_box``; exact). Real organs fill a few % of the volume, so this does a few %
  of the work. CUDA default (``crop=False``): all organs batched over the whole volume, no
  host/device synchronisation until the final summary (one ``.cpu()``).
- No Python loop over voxels anywhere; the loops are over models, axes, organs or chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch

from lib.classes import OVERLAP_ORGANS

__all__ = [
    "AttentionResult",
    "compute_attention",
    "attention_labels",
    "attention_heat",
    "binary_dilation",
    "binary_erosion",
    "binary_opening",
    "uncertainty",
    "inconsistency",
    "LABEL_NONE",
    "LABEL_UNCERTAIN",
    "LABEL_INCONSISTENT",
    "LABEL_OVERLAP",
    "LABEL_NAMES",
]

U_THRESHOLD = 0.05
C_THRESHOLD = 0.1
OPENING_ITERATIONS = 2

# Label image values for a viewer overlay (see attention_labels).
LABEL_NONE = 0
LABEL_UNCERTAIN = 1
LABEL_INCONSISTENT = 2
LABEL_OVERLAP = 3
LABEL_NAMES = {
    LABEL_NONE: "none",
    LABEL_UNCERTAIN: "uncertain",
    LABEL_INCONSISTENT: "inconsistent",
    LABEL_OVERLAP: "overlap",
}

# Organ-voxels per chunk when organ_chunk is not given (work buffers: (4 + M) floats + (1 + 2 M)
# bytes per organ-voxel: ~23 GB for all 25 organs x 3 models at 256x256x400 on a GPU).
_CPU_CHUNK_VOXELS = 2**26
_CUDA_CHUNK_VOXELS = 2**30


@dataclass
class AttentionResult:
    """Attention of one volume. Maps are ``(C, D, H, W)`` on the input device, organs in input order."""

    organ_names: List[str]
    uncertain: torch.Tensor  # U_b, bool
    inconsistent: torch.Tensor  # C_b, bool (all False when M = 1)
    overlap: torch.Tensor  # O_b, bool
    attention: torch.Tensor  # A_b = U_b | C_b | O_b, bool
    heat: torch.Tensor  # H in [0, 1], float (float64 if probs were float64, else float32)
    score: Union[int, float]  # sum_b |A_b| (int), or the size-normalised score (float)
    attention_voxels: Dict[str, int]  # |A_b| per organ
    heat_sums: Dict[str, float]  # sum of H per organ
    priority: List[str]  # organ names by descending heat sum (ties: input order)
    organ_scores: Dict[str, float] = field(default_factory=dict)  # each organ's term of the score
    normalised: bool = False
    entropy: str = "positive"


# --------------------------------------------------------------------------------------------------
# Morphology on 0/1 uint8 tensors: the last three dims are the volume, leading dims are a batch.


def _line_(dst: torch.Tensor, src: torch.Tensor, dim: int, radius: int, erode: bool, ends_clear: bool = False) -> None:
    """``dst[i] = op(src[i - radius], ..., src[i + radius])`` along ``dim``; op = AND (erode) or OR.

    ``dst`` and ``src`` are distinct 0/1 uint8 tensors of one shape. Outside the volume counts as
    background: the erosion clears the ``radius`` voxels at each end, the dilation takes nothing
    from outside. ``ends_clear``: the caller knows ``src`` is 0 in the ``radius`` voxels at each end
    along ``dim`` (true after an erosion of that radius).
    """
    n = src.shape[dim]
    if erode and n <= 2 * radius:
        dst.zero_()
        return
    if n == 1 or radius == 0:
        dst.copy_(src)
        return
    last = dim in (-1, src.ndim - 1)
    if last and (erode or ends_clear) and src.is_contiguous() and dst.is_contiguous():
        # Along the last axis the shifted views are short rows (slow loops when W is small), so
        # shift the flattened tensors. That mixes each row's end voxels with the next row's start:
        # harmless when the ends are cleared afterwards (erosion) or are 0 in src (ends_clear).
        _shift_all_(dst.view(-1), src.view(-1), 0, radius, erode)
    else:
        _shift_all_(dst, src, dim, radius, erode)
    if erode:
        for j in list(range(radius)) + list(range(n - radius, n)):
            dst.select(dim, j).zero_()


def _shift_all_(dst: torch.Tensor, src: torch.Tensor, dim: int, radius: int, erode: bool) -> None:
    """``dst = op of src shifted by -radius..radius along dim`` (ends: only what is inside)."""
    n = src.shape[dim]
    op = torch.bitwise_and if erode else torch.bitwise_or
    op(src.narrow(dim, 1, n - 1), src.narrow(dim, 0, n - 1), out=dst.narrow(dim, 1, n - 1))
    dst.narrow(dim, 0, 1).copy_(src.narrow(dim, 0, 1))
    for s in range(1, min(radius, n - 1) + 1):
        lo, hi = dst.narrow(dim, 0, n - s), dst.narrow(dim, s, n - s)
        if s > 1:
            op(hi, src.narrow(dim, 0, n - s), out=hi)
        op(lo, src.narrow(dim, s, n - s), out=lo)


def _morph(x: torch.Tensor, radius: int, erode: bool, work: torch.Tensor, ends_clear: bool = False) -> torch.Tensor:
    """Erosion/dilation of 0/1 uint8 ``x`` by the (2 radius + 1)^3 cube (= ``radius`` iterations of
    the 3x3x3 cube), one axis at a time, ping-ponging between ``x`` and ``work`` (same shape and
    dtype); both are overwritten. Returns the one holding the result (``work``: three axes).
    ``ends_clear``: ``x`` is 0 within ``radius`` voxels of every face (it is an erosion's result)."""
    a, b = x, work
    for dim in (-3, -2, -1):
        # A dilation along the first axes keeps the later axes' ends clear.
        _line_(b, a, dim, radius, erode, ends_clear)
        a, b = b, a
    return a


def _opening_(x: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """Opening of 0/1 uint8 ``x`` in place (six axis passes end back in ``x``)."""
    y = _morph(x, OPENING_ITERATIONS, True, work)
    z = _morph(y, OPENING_ITERATIONS, False, x if y is work else work, ends_clear=True)
    assert z is x
    return x


def _as_u8_copy(x: torch.Tensor) -> torch.Tensor:
    if x.ndim < 3:
        raise ValueError(f"expected a (..., D, H, W) tensor, got shape {tuple(x.shape)}")
    return x.to(torch.bool).contiguous().clone().view(torch.uint8)


def binary_dilation(x: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """``scipy.ndimage.binary_dilation`` with the 3x3x3 full element, ``iterations`` times, over the
    last 3 dims (leading dims are a batch). Returns a new bool tensor."""
    y = _as_u8_copy(x)
    if iterations > 0:
        y = _morph(y, iterations, False, torch.empty_like(y))
    return y.view(torch.bool)


def binary_erosion(x: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """``scipy.ndimage.binary_erosion`` (3x3x3 full element, outside = background), batched."""
    y = _as_u8_copy(x)
    if iterations > 0:
        y = _morph(y, iterations, True, torch.empty_like(y))
    return y.view(torch.bool)


def binary_opening(x: torch.Tensor, iterations: int = OPENING_ITERATIONS) -> torch.Tensor:
    """Erosion then dilation, ``iterations`` each, 3x3x3 full element, scipy border semantics."""
    y = _as_u8_copy(x)
    if iterations > 0:
        w = torch.empty_like(y)
        e = _morph(y, iterations, True, w)
        y = _morph(e, iterations, False, y if e is w else w, ends_clear=True)
    return y.view(torch.bool)


# --------------------------------------------------------------------------------------------------
# Reductions and the per-voxel maps.


def _count_true(x: torch.Tensor) -> torch.Tensor:
    """Non-zero voxels of each leading entry of a 0/1 uint8 (or bool) ``(k, ...)`` tensor, int64.

    Adds the bytes 8 at a time: they are viewed as int64 words and summed in blocks of at most 255
    words, so no byte lane carries into the next; the 8 lanes are then added. (A plain ``sum`` of a
    bool/uint8 tensor was ~15x slower on the CPU.) Falls back to ``sum`` when the layout does not
    allow the int64 view.
    """
    k = x.shape[0]
    flat = x.reshape(k, -1).view(torch.uint8)
    n = flat.shape[1]
    if n == 0 or k == 0:
        return torch.zeros(k, dtype=torch.int64, device=x.device)
    if n % 8 or flat.storage_offset() % 8 or not flat.is_contiguous():
        return flat.sum(dim=1, dtype=torch.int64)
    words = flat.view(torch.int64)  # (k, n / 8)
    nw = words.shape[1]
    full = nw // 255 * 255
    parts = []
    if full:
        parts.append(words[:, :full].reshape(k, full // 255, 255).sum(dim=2))
    if nw > full:
        parts.append(words[:, full:].sum(dim=1, keepdim=True))
    s = torch.cat(parts, dim=1)  # every byte lane <= 255
    total = torch.zeros(k, dtype=torch.int64, device=x.device)
    for lane in range(8):
        total += ((s >> (8 * lane)) & 255).sum(dim=1)
    return total


def _sum_float64(x: torch.Tensor) -> torch.Tensor:
    """Per-leading-entry sum of a float ``(k, D, H, W)`` tensor; rows of W summed in the input
    dtype, the rest accumulated in float64 (a full float64 cast was ~4x slower on the CPU)."""
    if x.dtype == torch.float64:
        return x.sum(dim=(1, 2, 3))
    return x.sum(dim=-1).sum(dim=(1, 2), dtype=torch.float64)


def _plogp_(x: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``out = x' ln x'`` with ``x' = max(x, tiny)`` (tiny = smallest normal float) = -entr(x').

    The clamp keeps zeros and subnormal numbers out of the log and the product: on the CPU they were
    measured 10-25x slower than ordinary numbers (and p = 0 is common: absent organs). It changes
    the value only for x < tiny, where entr is < 1.1e-36 (float32; 1.7e-305 float64) either way, so
    no threshold, map or heat value moves. ``scratch`` may be ``x`` itself (then clamped in place).
    """
    torch.clamp_min(x, torch.finfo(x.dtype).tiny, out=scratch)
    torch.log(scratch, out=out)
    return out.mul_(scratch)


def _uncertainty_into(p, entropy, out, t1, s1, s2):
    """``out = (e(p_1) + ... + e(p_M)) / M``, models added in order; e = entr, or entr(p) + entr(1-p).

    Computed as ``(p_1 ln p_1 + ...) / (-M)``: negation is exact, so this is bit-for-bit the mean of
    the entr values, one pass cheaper per model. ``p``: ``(M, k, ...)``; ``out``, ``t1``, ``s1``,
    ``s2``: ``(k, ...)`` buffers (``s2`` is used by the binary entropy only).
    """
    n_models = p.shape[0]
    one = torch.ones((), dtype=p.dtype, device=p.device)
    for m in range(n_models):
        dst = out if m == 0 else t1
        _plogp_(p[m], dst, s1)
        if entropy == "binary":
            torch.sub(one, p[m], out=s2)  # 1 - p
            dst.add_(_plogp_(s2, s1, s2))
        if m:
            out.add_(t1)
    return out.div_(-n_models)


def _inconsistency_into(p, near, kept, out, mean, tmp, work, floor_tiny=False):
    """Population std over models of ``p_m`` kept (else 0) on the 1-voxel dilation of model mask m.

    ``p``: ``(M, k, ...)`` float; ``near``: ``(M, k, ...)`` 0/1 uint8 model masks (overwritten);
    ``kept``: ``(M, k, ...)`` float buffer; ``out``, ``mean``, ``tmp``: ``(k, ...)`` float buffers;
    ``work``: ``(M, k, ...)`` uint8 buffer. Two passes (mean, then mean squared deviation), models
    added in order: the operations of ``numpy.std(..., axis=0)``. Needs M >= 2. (``torch.std``
    over the model dim was measured ~8x slower on the CPU.)

    ``floor_tiny``: take the square root of ``max(variance, tiny)`` (tiny = smallest normal float).
    The CPU's sqrt of 0 was measured ~10x slower than of other numbers, and the variance is 0 almost
    everywhere (outside all models' masks). It changes C only where C < 1.1e-19 (float32;
    1.5e-154 float64), far below the 0.1 threshold, so C_b and C * C_b are exactly unchanged.
    """
    n_models = p.shape[0]
    grown = _morph(near, 1, False, work)  # all models at once
    kept.copy_(grown).mul_(p)  # p * 1 = p, p * 0 = 0 (finite p)
    torch.add(kept[0], kept[1], out=mean)
    for m in range(2, n_models):
        mean.add_(kept[m])
    mean.div_(n_models)
    for m in range(n_models):
        dst = out if m == 0 else tmp
        torch.sub(kept[m], mean, out=dst)
        dst.mul_(dst)
        if m:
            out.add_(tmp)
    out.div_(n_models)
    if floor_tiny:
        out.clamp_min_(torch.finfo(out.dtype).tiny)
    return out.sqrt_()


def _work_float(probs: torch.Tensor) -> torch.Tensor:
    return probs if probs.dtype in (torch.float32, torch.float64) else probs.to(torch.float32)


def uncertainty(probs: torch.Tensor, entropy: str = "positive") -> torch.Tensor:
    """Uncertainty ``U`` ``(C, D, H, W)`` of ``probs`` ``(M, C, D, H, W)``: the mean over models of
    ``-p ln p`` (``entropy="positive"``) or of ``-p ln p - (1-p) ln(1-p)`` (``"binary"``), with p
    clamped to >= the smallest normal float inside the entropy (see ``_plogp_``: U is then
    ~1e-36 (float32) / ~1e-305 (float64) instead of exactly 0 where every p is 0 or 1)."""
    if entropy not in ("positive", "binary"):
        raise ValueError(f"entropy must be 'positive' or 'binary', got {entropy!r}")
    p = _work_float(probs)
    return _uncertainty_into(p, entropy, *[torch.empty_like(p[0]) for _ in range(4)])


def inconsistency(probs: torch.Tensor, model_masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inconsistency ``C`` ``(C, D, H, W)``: population std over models of each ``p_m`` set to 0
    outside the 1-voxel (3x3x3) dilation of model m's mask (default ``probs >= 0.5``); 0 if M = 1."""
    p = _work_float(probs)
    if p.shape[0] == 1:
        return torch.zeros_like(p[0])
    near = p >= 0.5 if model_masks is None else model_masks.to(device=p.device, dtype=torch.bool).clone()
    near = near.contiguous().view(torch.uint8)
    f = [torch.empty_like(p[0]) for _ in range(3)]
    return _inconsistency_into(p, near, torch.empty_like(p), f[0], f[1], f[2], torch.empty_like(near))


def _entropy_floor(entropy: str, threshold: float) -> float:
    """A probability ``p_lo`` such that any p <= p_lo has entropy term < threshold / 2 (so a voxel
    whose models all give p <= p_lo cannot have U > threshold, whatever the rounding)."""
    def term(p: float) -> float:
        h = -p * math.log(p)
        return h - (1 - p) * math.log1p(-p) if entropy == "binary" else h

    lo, hi = 1e-300, 0.3  # the term rises on (0, 0.3]
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if term(mid) < threshold / 2 else (lo, mid)
    return lo


def _active_box(p_b, mask8_b, mm8_b, p_lo, scratch):
    """Bounding box (tuple of 3 slices, grown by 1 voxel, clipped) of the voxels where organ b can
    have attention: some model's p > p_lo (else U <= threshold / 2), its ensemble mask (O_b), and its
    model masks (C is 0 beyond one voxel of them). ``None`` if there are none.

    U_b, C_b and the heat are 0 outside this box, and computing them on the box alone is exact:
    U and C are voxel-wise; each model mask's 1-voxel dilation stays inside the grown box; and an
    opening of a set inside the box never reaches outside it, while treating "outside the box" as
    background (as the erosion does at the volume border) changes nothing, since the set is empty
    there anyway. Works on projections (max over the models, then over axes), not voxel masks.
    """
    pmax = p_b[0] if p_b.shape[0] == 1 else torch.maximum(p_b[0], p_b[1], out=scratch)
    for m in range(2, p_b.shape[0]):
        pmax = torch.maximum(pmax, p_b[m], out=scratch)
    w = pmax.shape[-1]
    proj_dh = pmax.amax(dim=-1) > p_lo  # (D, H)
    proj_w = pmax.reshape(-1, w).amax(dim=0) > p_lo  # (W,)
    masks = [mask8_b] + ([] if mm8_b is None else [mm8_b[m] for m in range(mm8_b.shape[0])])
    for mk in masks:
        proj_dh |= mk.amax(dim=-1).bool()
        proj_w |= mk.reshape(-1, w).amax(dim=0).bool()
    spans = []
    for proj in (proj_dh.any(dim=1), proj_dh.any(dim=0), proj_w):
        idx = torch.nonzero(proj).flatten()
        if idx.numel() == 0:
            return None
        lo, hi = int(idx[0]) - 1, int(idx[-1]) + 2
        spans.append(slice(max(lo, 0), min(hi, proj.numel())))
    return tuple(spans)


class _Buffers:
    """Named flat work buffers, reused across chunks/organs; ``get`` returns a contiguous view."""

    def __init__(self, device: torch.device):
        self.device = device
        self.store: Dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        buf = self.store.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self.store[name] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(shape)


def _organ_maps_(p, mm8, ob, entropy, ub, cb, h, buf: _Buffers) -> None:
    """U_b, C_b and the un-normalised heat ``(U * U_b + C * C_b) + O_b`` of k organs.

    ``p``: ``(M, k, ...)`` float; ``mm8``: ``(M, k, ...)`` 0/1 uint8 model masks, or None for
    ``p >= 0.5``; ``ob``: ``(k, ...)`` 0/1 uint8 O_b; outputs ``ub``, ``cb`` (0/1 uint8) and ``h``
    (float): contiguous ``(k, ...)`` tensors.
    """
    n_models = p.shape[0]
    shape, dtype = tuple(ub.shape), h.dtype
    u, t = buf.get("u", shape, dtype), buf.get("t", shape, dtype)
    s1, s2 = buf.get("s1", shape, dtype), buf.get("s2", shape, dtype)
    w = buf.get("w", shape, torch.uint8)

    _uncertainty_into(p, entropy, u, t, s1, s2)
    torch.gt(u, U_THRESHOLD, out=ub.view(torch.bool))
    _opening_(ub, w)
    h.copy_(ub).mul_(u)  # U * U_b

    if n_models > 1:
        near = buf.get("near", (n_models,) + shape, torch.uint8)
        kept = buf.get("kept", (n_models,) + shape, dtype)
        if mm8 is None:
            torch.ge(p, 0.5, out=near.view(torch.bool))
        else:
            near.copy_(mm8)
        wm = buf.get("wm", (n_models,) + shape, torch.uint8)
        c = _inconsistency_into(p, near, kept, s1, s2, t, wm, floor_tiny=True)
        torch.gt(c, C_THRESHOLD, out=cb.view(torch.bool))
        _opening_(cb, w)
        h.addcmul_(c, t.copy_(cb))  # + C * C_b (exact: C_b is 0 or 1, so there is one rounding)
    else:
        cb.zero_()
    h.add_(t.copy_(ob))  # + O_b


def compute_attention(
    probs: torch.Tensor,
    masks: torch.Tensor,
    organ_names: Sequence[str],
    model_masks: Optional[torch.Tensor] = None,
    *,
    entropy: str = "positive",
    normalise_score: bool = False,
    overlap_organs: Sequence[str] = OVERLAP_ORGANS,
    crop: Optional[bool] = None,
    organ_chunk: Optional[int] = None,
    num_threads: Optional[int] = None,
) -> AttentionResult:
    """Attention maps, heat, score and organ priority of one volume.

    Args:
        probs: ``(M, C, D, H, W)`` float, per-model sigmoid probabilities of the C organs
            (float32/float64 are computed in their own precision, other dtypes in float32).
        masks: ``(C, D, H, W)`` bool, the ensemble organ masks (post-processed).
        organ_names: the C organ names in channel order (they decide which are overlap organs).
        model_masks: ``(M, C, D, H, W)`` bool, each model's own organ masks; default ``probs >= 0.5``.
        entropy: ``"positive"`` (the reference: ``-p ln p``) or ``"binary"`` (adds ``-(1-p) ln(1-p)``).
        normalise_score: the size-normalised score (see the module docstring).
        overlap_organs: names that count as "other organs" for the overlap (default: the 20
            non-vessel organs of ``lib.classes.OVERLAP_ORGANS``).
        crop: work organ by organ on the box where the organ can have attention (see
            ``_active_box``; exact). Default: on the CPU yes; on CUDA no (all organs batched, no
            host/device synchronisation until the end).
        organ_chunk: without cropping, organs per batch. Default: as many as fit 2^30 organ-voxels
            on CUDA (all 25 at 256x256x400), 2^26 on the CPU. Results do not depend on it.
        num_threads: torch CPU threads for this call (``torch.set_num_threads``, restored after;
            process-wide, so not for concurrent callers). Default: leave torch's setting. On a CPU
            shared with other busy processes, 1 thread was measured up to ~8x faster than 2 (each
            parallel op waits for the second thread to be scheduled).
    """
    if num_threads is not None and probs.device.type == "cpu":
        previous = torch.get_num_threads()
        torch.set_num_threads(int(num_threads))
        try:
            return compute_attention(
                probs, masks, organ_names, model_masks, entropy=entropy, normalise_score=normalise_score,
                overlap_organs=overlap_organs, crop=crop, organ_chunk=organ_chunk,
            )
        finally:
            torch.set_num_threads(previous)

    if probs.ndim != 5:
        raise ValueError(f"probs must be (M, C, D, H, W), got shape {tuple(probs.shape)}")
    n_models, n_organs = probs.shape[:2]
    vol = tuple(probs.shape[2:])
    names = list(organ_names)
    if n_models < 1:
        raise ValueError("need at least one model")
    if len(names) != n_organs:
        raise ValueError(f"{len(names)} organ names for {n_organs} probability channels")
    if len(set(names)) != len(names):
        raise ValueError("organ names must be unique")
    if tuple(masks.shape) != (n_organs,) + vol:
        raise ValueError(f"masks must have shape {(n_organs,) + vol}, got {tuple(masks.shape)}")
    if model_masks is not None and tuple(model_masks.shape) != tuple(probs.shape):
        raise ValueError(f"model_masks must have shape {tuple(probs.shape)}, got {tuple(model_masks.shape)}")
    if entropy not in ("positive", "binary"):
        raise ValueError(f"entropy must be 'positive' or 'binary', got {entropy!r}")

    device = probs.device
    dtype = probs.dtype if probs.dtype in (torch.float32, torch.float64) else torch.float32
    masks8 = masks.to(device=device, dtype=torch.bool).view(torch.uint8)
    mm8 = None if model_masks is None else model_masks.to(device=device, dtype=torch.bool).view(torch.uint8)
    if crop is None:
        crop = device.type != "cuda"
    n_vox = 1
    for s in vol:
        n_vox *= s

    out_u = torch.empty((n_organs,) + vol, dtype=torch.uint8, device=device)  # 0/1, handed out as bool
    out_c, out_o, out_a = torch.empty_like(out_u), torch.empty_like(out_u), torch.empty_like(out_u)
    heat = torch.empty((n_organs,) + vol, dtype=dtype, device=device)
    buf = _Buffers(device)
    step_max = []

    # Overlap: how many overlap organs claim each voxel. Organ b has "another" organ there when the
    # count exceeds b's own part in it (1 if b is an overlap organ, else 0; O_b is then ANDed with b's
    # mask, so b's part is counted exactly where it matters).
    ov = set(overlap_organs)
    is_ov = torch.tensor([n in ov for n in names], dtype=torch.uint8, device=device).view(-1, 1, 1, 1)
    claims = torch.zeros(vol, dtype=torch.uint8 if n_organs < 256 else torch.int32, device=device)
    for i, name in enumerate(names):
        if name in ov:
            claims.add_(masks8[i])
    torch.gt(claims, is_ov, out=out_o.view(torch.bool))
    out_o.bitwise_and_(masks8)
    del claims

    if crop:
        out_u.zero_()
        out_c.zero_()
        heat.zero_()
        p_lo = _entropy_floor(entropy, U_THRESHOLD)
        scratch = torch.empty(vol, dtype=probs.dtype, device=device)
        boxes = [
            _active_box(probs[:, b], masks8[b], None if mm8 is None else mm8[:, b], p_lo, scratch)
            for b in range(n_organs)
        ]
        del scratch
        for b, box in enumerate(boxes):
            if box is None:
                continue  # nothing there: U_b, C_b, O_b and the heat are all 0
            sel = (slice(None), slice(b, b + 1)) + box
            shape = (1,) + tuple(s.stop - s.start for s in box)
            whole = shape[1:] == vol  # the box is the volume: write the outputs in place
            if whole:
                ub, cb, h = out_u[b : b + 1], out_c[b : b + 1], heat[b : b + 1]
            else:
                ub, cb = buf.get("ub", shape, torch.uint8), buf.get("cb", shape, torch.uint8)
                h = buf.get("h", shape, dtype)
            _organ_maps_(
                probs[sel].to(dtype), None if mm8 is None else mm8[sel], out_o[sel[1:]], entropy, ub, cb, h, buf
            )
            if not whole:
                out_u[sel[1:]].copy_(ub)
                out_c[sel[1:]].copy_(cb)
                heat[sel[1:]].copy_(h)
            step_max.append(h.amax())
    else:
        if organ_chunk is None:
            budget = _CUDA_CHUNK_VOXELS if device.type == "cuda" else _CPU_CHUNK_VOXELS
            organ_chunk = budget // max(n_vox, 1)
        k_max = max(1, min(int(organ_chunk), n_organs))
        for c0 in range(0, n_organs, k_max):
            c1 = min(c0 + k_max, n_organs)
            _organ_maps_(
                probs[:, c0:c1].to(dtype),
                None if mm8 is None else mm8[:, c0:c1],
                out_o[c0:c1],
                entropy,
                out_u[c0:c1],
                out_c[c0:c1],
                heat[c0:c1],
                buf,
            )
            if n_vox:
                step_max.append(heat[c0:c1].amax())
    del buf

    torch.bitwise_or(out_u, out_c, out=out_a).bitwise_or_(out_o)
    if step_max:
        top = torch.stack(step_max).amax()
        heat.div_(torch.where(top > 0, top, torch.ones_like(top)))

    region = torch.zeros(n_organs, dtype=torch.int64, device=device)
    if normalise_score:
        for c0 in range(n_organs):  # |A_b OR mask_b|, one organ at a time (small temporaries)
            region[c0 : c0 + 1] = _count_true(torch.bitwise_or(out_a[c0 : c0 + 1], masks8[c0 : c0 + 1]))
    summary = torch.stack([_count_true(out_a).to(torch.float64), _sum_float64(heat), region.to(torch.float64)])
    summary = summary.cpu()  # the one host/device synchronisation (with the crop boxes on the CPU)
    vox_list = [int(v) for v in summary[0].tolist()]
    sum_list = summary[1].tolist()
    region_list = [int(v) for v in summary[2].tolist()]

    if normalise_score:
        terms = [a / r if r else 0.0 for a, r in zip(vox_list, region_list)]
        score: Union[int, float] = float(sum(terms))
    else:
        terms = [float(a) for a in vox_list]
        score = int(sum(vox_list))
    order = sorted(range(n_organs), key=lambda i: (-sum_list[i], i))
    return AttentionResult(
        organ_names=names,
        uncertain=out_u.view(torch.bool),
        inconsistent=out_c.view(torch.bool),
        overlap=out_o.view(torch.bool),
        attention=out_a.view(torch.bool),
        heat=heat,
        score=score,
        attention_voxels=dict(zip(names, vox_list)),
        heat_sums=dict(zip(names, sum_list)),
        priority=[names[i] for i in order],
        organ_scores=dict(zip(names, terms)),
        normalised=normalise_score,
        entropy=entropy,
    )


def _organ_rows(result: AttentionResult, organ: Optional[Union[str, Sequence[str]]]) -> slice | List[int]:
    if organ is None:
        return slice(None)
    wanted = [organ] if isinstance(organ, str) else list(organ)
    missing = [o for o in wanted if o not in result.organ_names]
    if missing:
        raise ValueError(f"unknown organ(s) {missing}; have {result.organ_names}")
    return [result.organ_names.index(o) for o in wanted]


def attention_labels(result: AttentionResult, organ: Optional[Union[str, Sequence[str]]] = None) -> torch.Tensor:
    """``(D, H, W)`` uint8 label image of the attention, for a viewer overlay.

    0 none, 1 uncertain (U_b), 2 inconsistent (C_b), 3 overlap (O_b). Where a voxel is in several
    maps the highest number wins: overlap > inconsistent > uncertain (an overlap is a certain
    error, a disagreement between models a likelier one than low confidence). ``organ``: one name or
    several; default all organs (a voxel takes the highest label any of them gives it).
    """
    rows = _organ_rows(result, organ)
    u = result.uncertain[rows].any(dim=0)
    c = result.inconsistent[rows].any(dim=0)
    o = result.overlap[rows].any(dim=0)
    lab = u.to(torch.uint8)  # 0 or LABEL_UNCERTAIN
    lab = torch.where(c, torch.full_like(lab, LABEL_INCONSISTENT), lab)
    lab = torch.where(o, torch.full_like(lab, LABEL_OVERLAP), lab)
    return lab


def attention_heat(result: AttentionResult, organ: Optional[Union[str, Sequence[str]]] = None) -> torch.Tensor:
    """``(D, H, W)`` heat for a viewer: the maximum over the chosen organs (default all) of H."""
    return result.heat[_organ_rows(result, organ)].amax(dim=0)
