"""Attention maps and the importance score of AbdomenAtlas-8K active learning, in torch.

Formula: ``../shared/suprem/README.md`` (the project facts), section "Active learning in AbdomenAtlas-8K (the
importance score)". Pure functions on tensors (CPU or CUDA): no files, no server.

Per organ ``b`` (inputs: per-model sigmoid probabilities ``p_m``, m = 1..M, and the ensemble masks):

- uncertainty ``U = mean_m entr(p_m)``, ``entr(p) = -p ln p`` (0 at p = 0); ``U_b = opening(U > 0.05)``.
- inconsistency ``C = std_m(p_m * dilate1(mask_m))`` (population std, ddof 0); ``C_b = opening(C > 0.1)``;
  ``C = 0`` when M = 1.
- overlap ``O_b = mask_b AND (OR of mask_o over the overlap organs o != b)``.
- ``A_b = U_b | C_b | O_b``; heat ``H_b = (U * U_b + C * C_b + O_b) / max(...)``.
- score = sum over organs of ``|A_b|``; organ priority = organs by descending ``sum(H_b)``.

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
- "/ max" and the priority, as the original code does it (MrGiovanni/AbdomenAtlas): create_attention.py
  divides each organ's heat map by *that organ's own* maximum (``attention_heatmap /
  np.max(attention_heatmap)`` inside its loop over organs) and saves it as uint8
  (``(H * 255).astype(np.uint8)``, i.e. ``floor(255 H)``); priority_list then sums each organ's saved map,
  keeps the organs whose sum is not 0 and sorts them by descending sum. So here: ``H_b`` is divided by
  its own maximum (an organ whose maximum is 0 keeps a heat of zeros: no division), and
  ``heat_sums[b] = sum(floor(255 H_b)) / 255``, the sum of the saved map in units of its maximum. An
  organ's sum therefore says how much of it needs a look relative to its own worst voxel, not how
  large its heat is next to the other organs'. (Dividing by one maximum over all organs, as this code
  did before 2026-12-04, gives the order of the un-normalised sums and ranks organs with a low peak
  lower than the original does.)
- priority ties (equal heat sums, e.g. organs with no attention) keep the input order; organs with a
  zero sum stay in ``priority`` (last); the scorer's record lists only the others as organs to revise.

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

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
    heat: torch.Tensor  # H_b in [0, 1], each organ by its own maximum, float (float64 if probs were, else float32)
    score: Union[int, float]  # sum_b |A_b| (int), or the size-normalised score (float)
    attention_voxels: Dict[str, int]  # |A_b| per organ
    heat_sums: Dict[str, float]  # sum of floor(255 H_b) / 255 per organ (the original's saved map)
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
    along ``dim`` (true after an erosion of that radius). Returns nothing (``dst`` holds the result).
    """
    length = src.shape[dim]
    if erode and length <= 2 * radius:
        dst.zero_()
        return
    if length == 1 or radius == 0:
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
        for end in list(range(radius)) + list(range(length - radius, length)):
            dst.select(dim, end).zero_()


def _shift_all_(dst: torch.Tensor, src: torch.Tensor, dim: int, radius: int, erode: bool) -> None:
    """``dst = op of src shifted by -radius..radius along dim`` (ends: only what is inside).
    Returns nothing (``dst`` holds the result)."""
    length = src.shape[dim]
    op = torch.bitwise_and if erode else torch.bitwise_or
    op(src.narrow(dim, 1, length - 1), src.narrow(dim, 0, length - 1), out=dst.narrow(dim, 1, length - 1))
    dst.narrow(dim, 0, 1).copy_(src.narrow(dim, 0, 1))
    for shift in range(1, min(radius, length - 1) + 1):
        head, tail = dst.narrow(dim, 0, length - shift), dst.narrow(dim, shift, length - shift)
        if shift > 1:
            op(tail, src.narrow(dim, 0, length - shift), out=tail)
        op(head, src.narrow(dim, shift, length - shift), out=head)


def _morph(mask: torch.Tensor, radius: int, erode: bool, work: torch.Tensor, ends_clear: bool = False) -> torch.Tensor:
    """Erosion/dilation of 0/1 uint8 ``mask`` by the (2 radius + 1)^3 cube (= ``radius`` iterations
    of the 3x3x3 cube), one axis at a time, ping-ponging between ``mask`` and ``work`` (same shape
    and dtype); both are overwritten. Returns the one holding the result (``work``: three axes).
    ``ends_clear``: ``mask`` is 0 within ``radius`` voxels of every face (it is an erosion's result)."""
    src, dst = mask, work
    for dim in (-3, -2, -1):
        # A dilation along the first axes keeps the later axes' ends clear.
        _line_(dst, src, dim, radius, erode, ends_clear)
        src, dst = dst, src
    return src


def _opening_(mask: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """Opening of 0/1 uint8 ``mask`` in place (six axis passes end back in ``mask``). Returns ``mask``."""
    eroded = _morph(mask, OPENING_ITERATIONS, True, work)
    opened = _morph(eroded, OPENING_ITERATIONS, False, mask if eroded is work else work, ends_clear=True)
    assert opened is mask
    return mask


def _as_u8_copy(x: torch.Tensor) -> torch.Tensor:
    """A new contiguous 0/1 uint8 copy of ``x`` (non-zero = 1), which must have at least 3 dims."""
    if x.ndim < 3:
        raise ValueError(f"expected a (..., D, H, W) tensor, got shape {tuple(x.shape)}")
    return x.to(torch.bool).contiguous().clone().view(torch.uint8)


def binary_dilation(x: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """``scipy.ndimage.binary_dilation`` with the 3x3x3 full element, ``iterations`` times, over the
    last 3 dims (leading dims are a batch). Returns a new bool tensor."""
    mask = _as_u8_copy(x)
    if iterations > 0:
        mask = _morph(mask, iterations, False, torch.empty_like(mask))
    return mask.view(torch.bool)


def binary_erosion(x: torch.Tensor, iterations: int = 1) -> torch.Tensor:
    """``scipy.ndimage.binary_erosion`` (3x3x3 full element, outside = background), batched.
    Returns a new bool tensor."""
    mask = _as_u8_copy(x)
    if iterations > 0:
        mask = _morph(mask, iterations, True, torch.empty_like(mask))
    return mask.view(torch.bool)


def binary_opening(x: torch.Tensor, iterations: int = OPENING_ITERATIONS) -> torch.Tensor:
    """Erosion then dilation, ``iterations`` each, 3x3x3 full element, scipy border semantics.
    Returns a new bool tensor."""
    mask = _as_u8_copy(x)
    if iterations > 0:
        work = torch.empty_like(mask)
        eroded = _morph(mask, iterations, True, work)
        mask = _morph(eroded, iterations, False, mask if eroded is work else work, ends_clear=True)
    return mask.view(torch.bool)


# --------------------------------------------------------------------------------------------------
# Reductions and the per-voxel maps.


def _count_true(x: torch.Tensor) -> torch.Tensor:
    """Non-zero voxels of each leading entry of a 0/1 uint8 (or bool) ``(k, ...)`` tensor, int64.

    Adds the bytes 8 at a time: they are viewed as int64 words and summed in blocks of at most 255
    words, so no byte lane carries into the next; the 8 lanes are then added. (A plain ``sum`` of a
    bool/uint8 tensor was ~15x slower on the CPU.) Falls back to ``sum`` when the layout does not
    allow the int64 view.
    """
    n_rows = x.shape[0]
    flat = x.reshape(n_rows, -1).view(torch.uint8)
    n_bytes = flat.shape[1]
    if n_bytes == 0 or n_rows == 0:
        return torch.zeros(n_rows, dtype=torch.int64, device=x.device)
    if n_bytes % 8 or flat.storage_offset() % 8 or not flat.is_contiguous():
        return flat.sum(dim=1, dtype=torch.int64)
    words = flat.view(torch.int64)  # (k, n_bytes / 8)
    n_words = words.shape[1]
    n_blocked = n_words // 255 * 255
    block_sums = []
    if n_blocked:
        block_sums.append(words[:, :n_blocked].reshape(n_rows, n_blocked // 255, 255).sum(dim=2))
    if n_words > n_blocked:
        block_sums.append(words[:, n_blocked:].sum(dim=1, keepdim=True))
    lanes = torch.cat(block_sums, dim=1)  # every byte lane <= 255
    total = torch.zeros(n_rows, dtype=torch.int64, device=x.device)
    for lane in range(8):
        total += ((lanes >> (8 * lane)) & 255).sum(dim=1)
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


def _uncertainty_into(probs, entropy, out, term, scratch, complement):
    """``out = (e(p_1) + ... + e(p_M)) / M``, models added in order; e = entr, or entr(p) + entr(1-p).

    Computed as ``(p_1 ln p_1 + ...) / (-M)``: negation is exact, so this is bit-for-bit the mean of
    the entr values, one pass cheaper per model. ``probs``: ``(M, k, ...)``; ``out``, ``term``,
    ``scratch``, ``complement``: ``(k, ...)`` buffers (``complement`` is used by the binary entropy
    only). Returns ``out``.
    """
    n_models = probs.shape[0]
    one = torch.ones((), dtype=probs.dtype, device=probs.device)
    for m in range(n_models):
        dst = out if m == 0 else term
        _plogp_(probs[m], dst, scratch)
        if entropy == "binary":
            torch.sub(one, probs[m], out=complement)  # 1 - p
            dst.add_(_plogp_(complement, scratch, complement))
        if m:
            out.add_(term)
    return out.div_(-n_models)


def _inconsistency_into(probs, model_masks, kept, out, mean, deviation, work, floor_tiny=False):
    """Population std over models of ``p_m`` kept (else 0) on the 1-voxel dilation of model mask m.

    ``probs``: ``(M, k, ...)`` float; ``model_masks``: ``(M, k, ...)`` 0/1 uint8 (overwritten);
    ``kept``: ``(M, k, ...)`` float buffer; ``out``, ``mean``, ``deviation``: ``(k, ...)`` float
    buffers; ``work``: ``(M, k, ...)`` uint8 buffer. Two passes (mean, then mean squared deviation),
    models added in order: the operations of ``numpy.std(..., axis=0)``. Needs M >= 2.
    (``torch.std`` over the model dim was measured ~8x slower on the CPU.) Returns ``out``.

    ``floor_tiny``: take the square root of ``max(variance, tiny)`` (tiny = smallest normal float).
    The CPU's sqrt of 0 was measured ~10x slower than of other numbers, and the variance is 0 almost
    everywhere (outside all models' masks). It changes C only where C < 1.1e-19 (float32;
    1.5e-154 float64), far below the 0.1 threshold, so C_b and C * C_b are exactly unchanged.
    """
    n_models = probs.shape[0]
    grown = _morph(model_masks, 1, False, work)  # all models at once
    kept.copy_(grown).mul_(probs)  # p * 1 = p, p * 0 = 0 (finite p)
    torch.add(kept[0], kept[1], out=mean)
    for m in range(2, n_models):
        mean.add_(kept[m])
    mean.div_(n_models)
    for m in range(n_models):
        dst = out if m == 0 else deviation
        torch.sub(kept[m], mean, out=dst)
        dst.mul_(dst)
        if m:
            out.add_(deviation)
    out.div_(n_models)
    if floor_tiny:
        out.clamp_min_(torch.finfo(out.dtype).tiny)
    return out.sqrt_()


def _work_float(probs: torch.Tensor) -> torch.Tensor:
    """``probs`` itself if float32/float64, else a float32 copy."""
    return probs if probs.dtype in (torch.float32, torch.float64) else probs.to(torch.float32)


def uncertainty(probs: torch.Tensor, entropy: str = "positive") -> torch.Tensor:
    """Uncertainty ``U`` ``(C, D, H, W)`` of ``probs`` ``(M, C, D, H, W)``: the mean over models of
    ``-p ln p`` (``entropy="positive"``) or of ``-p ln p - (1-p) ln(1-p)`` (``"binary"``), with p
    clamped to >= the smallest normal float inside the entropy (see ``_plogp_``: U is then
    ~1e-36 (float32) / ~1e-305 (float64) instead of exactly 0 where every p is 0 or 1)."""
    if entropy not in ("positive", "binary"):
        raise ValueError(f"entropy must be 'positive' or 'binary', got {entropy!r}")
    work = _work_float(probs)
    return _uncertainty_into(work, entropy, *[torch.empty_like(work[0]) for _ in range(4)])


def inconsistency(probs: torch.Tensor, model_masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inconsistency ``C`` ``(C, D, H, W)``: population std over models of each ``p_m`` set to 0
    outside the 1-voxel (3x3x3) dilation of model m's mask (default ``probs >= 0.5``); 0 if M = 1."""
    work = _work_float(probs)
    if work.shape[0] == 1:
        return torch.zeros_like(work[0])
    if model_masks is None:
        masks = work >= 0.5
    else:
        masks = model_masks.to(device=work.device, dtype=torch.bool).clone()
    masks8 = masks.contiguous().view(torch.uint8)
    out, mean, deviation = (torch.empty_like(work[0]) for _ in range(3))
    return _inconsistency_into(work, masks8, torch.empty_like(work), out, mean, deviation, torch.empty_like(masks8))


def _entropy_floor(entropy: str, threshold: float) -> float:
    """A probability ``p_lo`` such that any p <= p_lo has entropy term < threshold / 2 (so a voxel
    whose models all give p <= p_lo cannot have U > threshold, whatever the rounding)."""
    def term(prob: float) -> float:
        positive = -prob * math.log(prob)
        return positive - (1 - prob) * math.log1p(-prob) if entropy == "binary" else positive

    lo, hi = 1e-300, 0.3  # the term rises on (0, 0.3]
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if term(mid) < threshold / 2 else (lo, mid)
    return lo


def _active_box(organ_probs, organ_mask, organ_model_masks, p_lo, scratch):
    """Bounding box (tuple of 3 slices, grown by 1 voxel, clipped) of the voxels where organ b can
    have attention: some model's p > p_lo (else U <= threshold / 2), its ensemble mask (O_b), and its
    model masks (C is 0 beyond one voxel of them). ``None`` if there are none.

    ``organ_probs``: ``(M, D, H, W)``; ``organ_mask``: ``(D, H, W)`` 0/1 uint8; ``organ_model_masks``:
    ``(M, D, H, W)`` 0/1 uint8 or None; ``scratch``: a ``(D, H, W)`` buffer of the probabilities' dtype.

    U_b, C_b and the heat are 0 outside this box, and computing them on the box alone is exact:
    U and C are voxel-wise; each model mask's 1-voxel dilation stays inside the grown box; and an
    opening of a set inside the box never reaches outside it, while treating "outside the box" as
    background (as the erosion does at the volume border) changes nothing, since the set is empty
    there anyway. Works on projections (max over the models, then over axes), not voxel masks.
    """
    n_models = organ_probs.shape[0]
    pmax = organ_probs[0] if n_models == 1 else torch.maximum(organ_probs[0], organ_probs[1], out=scratch)
    for m in range(2, n_models):
        pmax = torch.maximum(pmax, organ_probs[m], out=scratch)
    width = pmax.shape[-1]
    proj_dh = pmax.amax(dim=-1) > p_lo  # (D, H)
    proj_w = pmax.reshape(-1, width).amax(dim=0) > p_lo  # (W,)
    masks = [organ_mask] + ([] if organ_model_masks is None else list(organ_model_masks.unbind(0)))
    for mask in masks:
        proj_dh |= mask.amax(dim=-1).bool()
        proj_w |= mask.reshape(-1, width).amax(dim=0).bool()
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
        """A ``shape`` view of the buffer ``name``, (re)allocated when missing, too small or of another dtype."""
        size = 1
        for extent in shape:
            size *= extent
        buf = self.store.get(name)
        if buf is None or buf.numel() < size or buf.dtype != dtype:
            buf = self.store[name] = torch.empty(size, dtype=dtype, device=self.device)
        return buf[:size].view(shape)


def _organ_maps_(probs, model_masks, overlap, entropy, uncertain, inconsistent, heat, buffers: _Buffers) -> None:
    """U_b, C_b and the un-normalised heat ``(U * U_b + C * C_b) + O_b`` of k organs.

    ``probs``: ``(M, k, ...)`` float; ``model_masks``: ``(M, k, ...)`` 0/1 uint8 model masks, or None
    for ``probs >= 0.5``; ``overlap``: ``(k, ...)`` 0/1 uint8 O_b; outputs ``uncertain``,
    ``inconsistent`` (0/1 uint8) and ``heat`` (float): contiguous ``(k, ...)`` tensors. Returns
    nothing (the outputs are filled in place).
    """
    n_models = probs.shape[0]
    shape, dtype = tuple(uncertain.shape), heat.dtype
    uncertainty_map, term = buffers.get("uncertainty", shape, dtype), buffers.get("term", shape, dtype)
    scratch, spare = buffers.get("scratch", shape, dtype), buffers.get("spare", shape, dtype)
    work = buffers.get("work", shape, torch.uint8)

    _uncertainty_into(probs, entropy, uncertainty_map, term, scratch, spare)
    torch.gt(uncertainty_map, U_THRESHOLD, out=uncertain.view(torch.bool))
    _opening_(uncertain, work)
    heat.copy_(uncertain).mul_(uncertainty_map)  # U * U_b

    if n_models > 1:
        models_shape = (n_models,) + shape
        masks_work = buffers.get("model_masks", models_shape, torch.uint8)
        kept = buffers.get("kept", models_shape, dtype)
        if model_masks is None:
            torch.ge(probs, 0.5, out=masks_work.view(torch.bool))
        else:
            masks_work.copy_(model_masks)
        models_work = buffers.get("models_work", models_shape, torch.uint8)
        inconsistency_map = _inconsistency_into(
            probs, masks_work, kept, scratch, spare, term, models_work, floor_tiny=True
        )
        torch.gt(inconsistency_map, C_THRESHOLD, out=inconsistent.view(torch.bool))
        _opening_(inconsistent, work)
        # + C * C_b (exact: C_b is 0 or 1, so there is one rounding)
        heat.addcmul_(inconsistency_map, term.copy_(inconsistent))
    else:
        inconsistent.zero_()
    heat.add_(term.copy_(overlap))  # + O_b


# --------------------------------------------------------------------------------------------------
# The whole volume: argument checks, the overlap map, the two ways to fill the maps, the summary.


@contextmanager
def _torch_threads(num_threads: Optional[int]) -> Iterator[None]:
    """Context: torch CPU threads set to ``num_threads`` inside, the previous count restored on exit
    (``None``: left as they are). Yields nothing."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _checked_organ_names(
    probs: torch.Tensor,
    masks: torch.Tensor,
    organ_names: Sequence[str],
    model_masks: Optional[torch.Tensor],
    entropy: str,
) -> List[str]:
    """The organ names as a list, after checking shapes, names and ``entropy`` (``ValueError`` if wrong)."""
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
    return names


def _overlap_map(masks8: torch.Tensor, names: Sequence[str], overlap_organs: Sequence[str]) -> torch.Tensor:
    """O_b of every organ: a new 0/1 uint8 ``(C, D, H, W)`` tensor, from the 0/1 uint8 ensemble masks.

    Counts how many overlap organs claim each voxel. Organ b has "another" organ there when the count
    exceeds b's own part in it (1 if b is an overlap organ, else 0; O_b is then ANDed with b's mask,
    so b's part is counted exactly where it matters).
    """
    device = masks8.device
    overlapping = set(overlap_organs)
    own_claim = torch.tensor([n in overlapping for n in names], dtype=torch.uint8, device=device).view(-1, 1, 1, 1)
    claims_dtype = torch.uint8 if len(names) < 256 else torch.int32
    claims = torch.zeros(masks8.shape[1:], dtype=claims_dtype, device=device)
    for organ, name in enumerate(names):
        if name in overlapping:
            claims.add_(masks8[organ])
    overlap = torch.empty(masks8.shape, dtype=torch.uint8, device=device)
    torch.gt(claims, own_claim, out=overlap.view(torch.bool))
    return overlap.bitwise_and_(masks8)


@dataclass
class _VolumeMaps:
    """The per-organ output maps, ``(C, D, H, W)``: U_b, C_b, O_b as 0/1 uint8, and the heat (float)."""

    uncertain: torch.Tensor
    inconsistent: torch.Tensor
    overlap: torch.Tensor
    heat: torch.Tensor


def _active_boxes(probs, masks8, model_masks8, entropy: str) -> List[Optional[tuple]]:
    """``_active_box`` of every organ, in organ order (``None`` for an organ that cannot have attention)."""
    p_lo = _entropy_floor(entropy, U_THRESHOLD)
    scratch = torch.empty(tuple(probs.shape[2:]), dtype=probs.dtype, device=probs.device)
    return [
        _active_box(
            probs[:, organ], masks8[organ], None if model_masks8 is None else model_masks8[:, organ], p_lo, scratch
        )
        for organ in range(probs.shape[1])
    ]


def _organ_box_maps_(
    probs, model_masks8, organ: int, box: tuple, entropy: str, maps: _VolumeMaps, buffers: _Buffers
) -> torch.Tensor:
    """Fills organ ``organ``'s maps on ``box`` (its ``_active_box``) in ``maps`` (heat un-normalised)."""
    sel = (slice(None), slice(organ, organ + 1)) + box
    shape = (1,) + tuple(s.stop - s.start for s in box)
    whole = shape[1:] == tuple(probs.shape[2:])  # the box is the volume: write the outputs in place
    if whole:
        rows = slice(organ, organ + 1)
        uncertain, inconsistent, heat = maps.uncertain[rows], maps.inconsistent[rows], maps.heat[rows]
    else:
        uncertain = buffers.get("box_uncertain", shape, torch.uint8)
        inconsistent = buffers.get("box_inconsistent", shape, torch.uint8)
        heat = buffers.get("box_heat", shape, maps.heat.dtype)
    _organ_maps_(
        probs[sel].to(maps.heat.dtype),
        None if model_masks8 is None else model_masks8[sel],
        maps.overlap[sel[1:]],
        entropy,
        uncertain,
        inconsistent,
        heat,
        buffers,
    )
    if not whole:
        maps.uncertain[sel[1:]].copy_(uncertain)
        maps.inconsistent[sel[1:]].copy_(inconsistent)
        maps.heat[sel[1:]].copy_(heat)


def _fill_maps_by_organ_boxes(probs, masks8, model_masks8, entropy: str, maps: _VolumeMaps) -> None:
    """Fills ``maps`` organ by organ on each organ's active box (zero outside it; heat un-normalised)."""
    maps.uncertain.zero_()
    maps.inconsistent.zero_()
    maps.heat.zero_()
    boxes = _active_boxes(probs, masks8, model_masks8, entropy)
    buffers = _Buffers(probs.device)
    # An organ without a box has nothing: U_b, C_b, O_b and the heat are all 0.
    for organ, box in enumerate(boxes):
        if box is not None:
            _organ_box_maps_(probs, model_masks8, organ, box, entropy, maps, buffers)


def _fill_maps_by_organ_chunks(probs, model_masks8, entropy: str, organ_chunk: Optional[int], maps: _VolumeMaps) -> None:
    """Fills ``maps`` over the whole volume (heat un-normalised), ``organ_chunk`` organs at a time
    (default: as many as the device's voxel budget allows)."""
    n_organs = probs.shape[1]
    n_vox = math.prod(probs.shape[2:])
    if organ_chunk is None:
        budget = _CUDA_CHUNK_VOXELS if probs.device.type == "cuda" else _CPU_CHUNK_VOXELS
        organ_chunk = budget // max(n_vox, 1)
    chunk = max(1, min(int(organ_chunk), n_organs))
    buffers = _Buffers(probs.device)
    for first in range(0, n_organs, chunk):
        rows = slice(first, min(first + chunk, n_organs))
        _organ_maps_(
            probs[:, rows].to(maps.heat.dtype),
            None if model_masks8 is None else model_masks8[:, rows],
            maps.overlap[rows],
            entropy,
            maps.uncertain[rows],
            maps.inconsistent[rows],
            maps.heat[rows],
            buffers,
        )


def _normalise_heat_per_organ_(heat: torch.Tensor) -> torch.Tensor:
    """Divides each organ's heat ``(C, ...)`` in place by its own maximum (one whose maximum is 0 keeps
    its zeros), as the original's create_attention.py does before saving an organ's map. Returns ``heat``."""
    if heat.numel():
        top = heat.flatten(1).amax(dim=1)
        heat.div_(torch.where(top > 0, top, torch.ones_like(top)).view((-1,) + (1,) * (heat.dim() - 1)))
    return heat


def _saved_map_sums(heat: torch.Tensor) -> torch.Tensor:
    """Per organ, ``sum(floor(255 H_b)) / 255`` in float64: the sum of the uint8 map the original saves
    for each organ, which its priority list ranks by. One organ at a time (small temporaries)."""
    sums = torch.zeros(heat.shape[0], dtype=torch.float64, device=heat.device)
    for row in range(heat.shape[0]):
        sums[row : row + 1] = _sum_float64(torch.floor(heat[row : row + 1] * 255.0))
    return sums / 255.0


def _score_terms(
    attention_voxels: List[int], region_voxels: List[int], normalise_score: bool
) -> Tuple[List[float], Union[int, float]]:
    """Each organ's term of the score and the score: ``|A_b|`` and their int sum, or (normalised)
    ``|A_b| / |A_b OR mask_b|`` (0 for an empty region) and their float sum."""
    if normalise_score:
        terms = [a / r if r else 0.0 for a, r in zip(attention_voxels, region_voxels)]
        return terms, float(sum(terms))
    return [float(a) for a in attention_voxels], int(sum(attention_voxels))


def _summary(
    names: List[str],
    maps: _VolumeMaps,
    attention: torch.Tensor,
    masks8: torch.Tensor,
    normalise_score: bool,
    entropy: str,
) -> AttentionResult:
    """The ``AttentionResult`` of the filled, normalised ``maps`` and ``attention`` (A_b, 0/1 uint8):
    voxel counts and heat sums are brought to the host in one synchronisation."""
    n_organs = len(names)
    region = torch.zeros(n_organs, dtype=torch.int64, device=attention.device)
    if normalise_score:
        for row in range(n_organs):  # |A_b OR mask_b|, one organ at a time (small temporaries)
            rows = slice(row, row + 1)
            region[rows] = _count_true(torch.bitwise_or(attention[rows], masks8[rows]))
    summary = torch.stack(
        [_count_true(attention).to(torch.float64), _saved_map_sums(maps.heat), region.to(torch.float64)]
    )
    summary = summary.cpu()  # the one host/device synchronisation (with the crop boxes on the CPU)
    attention_voxels = [int(v) for v in summary[0].tolist()]
    heat_sums = summary[1].tolist()
    region_voxels = [int(v) for v in summary[2].tolist()]
    terms, score = _score_terms(attention_voxels, region_voxels, normalise_score)
    order = sorted(range(n_organs), key=lambda i: (-heat_sums[i], i))
    return AttentionResult(
        organ_names=names,
        uncertain=maps.uncertain.view(torch.bool),
        inconsistent=maps.inconsistent.view(torch.bool),
        overlap=maps.overlap.view(torch.bool),
        attention=attention.view(torch.bool),
        heat=maps.heat,
        score=score,
        attention_voxels=dict(zip(names, attention_voxels)),
        heat_sums=dict(zip(names, heat_sums)),
        priority=[names[i] for i in order],
        organ_scores=dict(zip(names, terms)),
        normalised=normalise_score,
        entropy=entropy,
    )


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
    device = probs.device
    with _torch_threads(num_threads if device.type == "cpu" else None):
        names = _checked_organ_names(probs, masks, organ_names, model_masks, entropy)
        dtype = probs.dtype if probs.dtype in (torch.float32, torch.float64) else torch.float32
        masks8 = masks.to(device=device, dtype=torch.bool).view(torch.uint8)
        model_masks8 = None
        if model_masks is not None:
            model_masks8 = model_masks.to(device=device, dtype=torch.bool).view(torch.uint8)
        maps = _VolumeMaps(
            uncertain=torch.empty(masks8.shape, dtype=torch.uint8, device=device),
            inconsistent=torch.empty(masks8.shape, dtype=torch.uint8, device=device),
            overlap=_overlap_map(masks8, names, overlap_organs),
            heat=torch.empty(masks8.shape, dtype=dtype, device=device),
        )
        by_organ_boxes = device.type != "cuda" if crop is None else crop
        if by_organ_boxes:
            _fill_maps_by_organ_boxes(probs, masks8, model_masks8, entropy, maps)
        else:
            _fill_maps_by_organ_chunks(probs, model_masks8, entropy, organ_chunk, maps)
        attention = torch.bitwise_or(maps.uncertain, maps.inconsistent).bitwise_or_(maps.overlap)
        _normalise_heat_per_organ_(maps.heat)
        return _summary(names, maps, attention, masks8, normalise_score, entropy)


def _organ_rows(result: AttentionResult, organ: Optional[Union[str, Sequence[str]]]) -> slice | List[int]:
    """Index of the chosen organs' rows in the result's maps: all (``None``), or the rows of the named ones."""
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
    uncertain = result.uncertain[rows].any(dim=0)
    inconsistent = result.inconsistent[rows].any(dim=0)
    overlap = result.overlap[rows].any(dim=0)
    labels = uncertain.to(torch.uint8)  # 0 or LABEL_UNCERTAIN
    labels = torch.where(inconsistent, torch.full_like(labels, LABEL_INCONSISTENT), labels)
    labels = torch.where(overlap, torch.full_like(labels, LABEL_OVERLAP), labels)
    return labels


def attention_heat(result: AttentionResult, organ: Optional[Union[str, Sequence[str]]] = None) -> torch.Tensor:
    """``(D, H, W)`` heat for a viewer: the maximum over the chosen organs (default all) of H."""
    return result.heat[_organ_rows(result, organ)].amax(dim=0)
