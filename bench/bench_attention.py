"""Benchmark: torch attention maps (lib/importance/attention.py) against the numpy+scipy reference.

Both run on the same synthetic input and their outputs are compared. Two input layouts (default:
both): ``compact``, one blob per organ like real organs (the CPU path then works on crops of a few %
of the volume), and ``scattered``, blobs all over the volume (the worst case: every crop is the
whole volume). The scipy reference takes ~10 s per organ on a 256x256x400 grid on the 2-core CPU
this was written on, so by default it runs on the first ``--ref-organs`` organs only, as a problem
of its own (both implementations are timed and compared on it), and its time for all organs is
*estimated* by scaling (printed as such); ``--ref-organs 0`` runs it on all organs.

    python -m bench.bench_attention                      # 25 organs x 3 models, 256x256x400, CPU
    python -m bench.bench_attention --threads 1          # torch on 1 CPU thread
    python -m bench.bench_attention --device cuda        # torch on the GPU (reference on the CPU)
    python -m bench.bench_attention --shape 128 128 100 --organs 10 --ref-organs 0 --layout compact

Needs ~15 GB of RAM at the default size (the input alone is 7.9 GB of float32).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from lib.classes import SUPREM_CLASSES
from lib.importance.attention import U_THRESHOLD, _active_box, _entropy_floor, compute_attention
from testing.attention_reference import reference_attention


def make_input(shape, n_organs, n_models, seed=0, layout="compact"):
    """Per-model sigmoid probabilities (M, C, D, H, W) float32 and ensemble masks (C, D, H, W) bool.

    ``compact`` (like real organs): each organ is one blob, an ellipsoid (semi-axes 4-25% of each
    dimension, at a random place) with a wavy surface; each model moves the surface by its own smooth
    perturbation, so the models agree inside and disagree at the rim. Away from it p is ~1e-6.
    ``scattered`` (worst case for the torch version's per-organ crops): smooth noise thresholded at
    its ~93rd percentile, so every organ is many blobs all over the volume.
    Ensemble masks = mean over models >= 0.5.
    """
    g = torch.Generator().manual_seed(seed)
    probs = torch.empty((n_models, n_organs) + tuple(shape), dtype=torch.float32)

    def smooth_noise(n, size, cells):
        coarse = tuple(max(2, s // cells) for s in size)
        z = torch.randn((n, 1) + coarse, generator=g)
        return F.interpolate(z, size=tuple(size), mode="trilinear", align_corners=False)[:, 0]

    for c in range(n_organs):
        if layout == "scattered":
            z = smooth_noise(1, shape, 16) + 0.35 * smooth_noise(n_models, shape, 16)
            probs[:, c] = z.sub_(1.5).mul_(12.0).sigmoid_()
            continue
        probs[:, c] = 1e-6
        semi = [max(2.0, float(s) * (0.04 + 0.21 * float(torch.rand((), generator=g)))) for s in shape]
        centre = [float(torch.rand((), generator=g)) * s for s in shape]
        box = [slice(max(0, int(ce - 1.4 * a)), min(s, int(ce + 1.4 * a) + 1)) for ce, a, s in zip(centre, semi, shape)]
        size = [b.stop - b.start for b in box]
        if min(size) < 1:
            continue
        grids = torch.meshgrid(
            *[(torch.arange(b.start, b.stop, dtype=torch.float32) - ce) / a for b, ce, a in zip(box, centre, semi)],
            indexing="ij",
        )
        r = torch.sqrt(sum(x * x for x in grids))  # 1 on the ellipsoid
        cells = max(2, min(size) // 4)
        surface = 1.0 - r + 0.12 * smooth_noise(1, size, cells)[0]
        logits = 30.0 * (surface + 0.06 * smooth_noise(n_models, size, cells))
        probs[(slice(None), c) + tuple(box)] = torch.sigmoid(logits).clamp_min_(1e-6)
    masks = probs.mean(dim=0) >= 0.5
    return probs, masks


def compare(res, ref):
    """(differing voxels over the 4 binary maps, max |heat diff|, score equal, priority equal)."""
    diff = 0
    for key in ("uncertain", "inconsistent", "overlap", "attention"):
        diff += int(np.count_nonzero(getattr(res, key).cpu().numpy() != ref[key]))
    heat = float(np.abs(res.heat.cpu().numpy().astype(np.float64) - ref["heat"]).max()) if ref["heat"].size else 0.0
    return diff, heat, res.score == ref["score"], res.priority == ref["priority"]


def time_torch(probs, masks, names, device, repeats):
    p, m = probs.to(device), masks.to(device)
    best, res = float("inf"), None
    for _ in range(repeats):
        res = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = compute_attention(p, m, names)  # ends with a host copy of the summary: synchronised
        best = min(best, time.perf_counter() - t0)
    return best, res


def box_fraction(probs, masks):
    """Mean share of the volume covered by the organs' crop boxes (what the CPU path works on)."""
    scratch = torch.empty(probs.shape[2:], dtype=probs.dtype)
    p_lo = _entropy_floor("positive", U_THRESHOLD)
    fr = []
    for b in range(probs.shape[1]):
        box = _active_box(probs[:, b], masks[b].view(torch.uint8), None, p_lo, scratch)
        fr.append(0.0 if box is None else float(np.prod([s.stop - s.start for s in box])) / masks[b].numel())
    return float(np.mean(fr))


def bench_layout(args, layout, device, names):
    shape = tuple(args.shape)
    t0 = time.perf_counter()
    probs, masks = make_input(shape, args.organs, args.models, args.seed, layout)
    t_gen = time.perf_counter() - t0
    n_ref = args.organs if args.ref_organs <= 0 or args.ref_organs >= args.organs else args.ref_organs
    note = (f"{layout}: input made in {t_gen:.0f} s, organ crop boxes "
            f"{100 * box_fraction(probs, masks):.1f}% of the volume on average")
    rows = []

    # 1) The reference's organs (all, or a subset as a problem of its own): both timed and compared.
    sub_p, sub_m = probs[:, :n_ref], masks[:n_ref]
    t0 = time.perf_counter()
    ref = reference_attention(sub_p.numpy(), sub_m.numpy(), names[:n_ref])
    t_ref = time.perf_counter() - t0
    t_sub, res = time_torch(sub_p, sub_m, names[:n_ref], device, args.repeats)
    ndiff, dheat, score_eq, prio_eq = compare(res, ref)
    match = (f"maps {'identical' if ndiff == 0 else f'{ndiff} voxels differ'}, heat max diff {dheat:.1e}, "
             f"score {'equal' if score_eq else 'DIFFERS'}, priority {'equal' if prio_eq else 'DIFFERS'}")
    rows.append((layout, n_ref, f"{t_ref:.1f}", t_sub, t_ref / t_sub, match))
    del ref, res, sub_p, sub_m
    gc.collect()

    # 2) All organs with torch; the reference time scaled from (1) if it ran on a subset.
    if n_ref < args.organs:
        t_all, res = time_torch(probs, masks, names, device, args.repeats)
        est = t_ref * args.organs / n_ref
        rows.append((layout, args.organs, f"~{est:.0f} (estimate: {t_ref:.1f} s x {args.organs}/{n_ref})", t_all,
                     est / t_all, f"not compared (reference not run on {args.organs} organs); score {res.score}"))
        del res
    del probs, masks
    gc.collect()
    return rows, note


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=[256, 256, 400], metavar=("D", "H", "W"))
    ap.add_argument("--organs", type=int, default=25, help="number of organs (the first N SuPreM classes)")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--layout", choices=["compact", "scattered", "both"], default="both",
                    help="compact: one blob per organ (realistic); scattered: blobs everywhere (worst case)")
    ap.add_argument("--device", default="cpu", help="torch device for the fast implementation")
    ap.add_argument("--ref-organs", type=int, default=3,
                    help="organs the scipy reference runs on (0 = all; else timed on that subset and scaled)")
    ap.add_argument("--repeats", type=int, default=1, help="torch runs per measurement (the best is kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = SUPREM_CLASSES[: args.organs]
    if device.type == "cuda":  # warm up kernels and the caching allocator
        compute_attention(torch.rand((args.models, 2, 16, 16, 16), device=device),
                          torch.zeros((2, 16, 16, 16), dtype=torch.bool, device=device), names[:2])

    rows, notes = [], []
    for layout in (["compact", "scattered"] if args.layout == "both" else [args.layout]):
        r, n = bench_layout(args, layout, device, names)
        rows += r
        notes.append(n)

    shape = "x".join(map(str, args.shape))
    print("# attention maps: torch (lib/importance/attention.py) vs numpy+scipy reference (attention_reference.py)")
    print(f"# host: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), numpy {np.__version__}; reference always on the CPU (single-threaded scipy)")
    if device.type == "cuda":
        print(f"# device: {torch.cuda.get_device_name(device)}")
    print("# input: synthetic per-model probabilities, float32; " + "; ".join(notes))
    hdr = ("input", "shape", "organs", "models", "device", "s reference", "s torch", "speed-up", "outputs")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for layout, n, t_r, t_t, sp, m in rows:
        print(f"| {layout} | {shape} | {n} | {args.models} | {device.type} | {t_r} | {t_t:.2f} | {sp:.1f}x | {m} |")


if __name__ == "__main__":
    main()
