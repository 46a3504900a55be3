"""Benchmark: batch scoring at scale: in-process vs Ray, the pre-processing cache, and a round's cost model.

    python -m bench.bench_scale engines [--volumes 8] [--workers 2]     # volumes/min, in-process vs Ray
    python -m bench.bench_scale cost [--device cuda]                    # cost model of one round

``engines``: writes ``--volumes`` synthetic abdominal phantoms (``testing.phantoms``, 128x128x96 at
1.5x1.5x2 mm), then scores the folder with the offline ranking (``lib.importance.rank.rank_folder``, the
same per-volume step as the server) three ways: in this process (torch on all cores), on a local Ray
with ``--workers`` 1-CPU workers (wall time including Ray's and the workers' start, and the steady rate
from the first to the last finished volume), and a second in-process round with the pre-processing
cache filled by the first (what a later round pays). SegResNet with synthetic weights in the released
format, overlap 0 by default (``--overlap``), so that a CPU run takes minutes.

``cost``: per backbone, the floating-point operations of one 96^3 window (counted by
``torch.utils.flop_counter``) and the measured seconds of one window on ``--device``; the attention's
seconds for 25 organs x 3 backbones on a ``--grid`` working grid; the windows per volume at the recipe
(overlap 0.75) and fast (0.5) presets on that grid. It then projects the wall time of one round's
re-scoring for 1,000 and 9,262 volumes on 1, 8 and 64 GPUs. Where the device is not a GPU, the GPU
seconds per window are *projected* from the FLOPs at an assumed sustained throughput (``--gpu-tflops``,
a range), and the table says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List

import torch

from bench.bench_infer import count_windows
from bench.machine import machine_facts
from lib.classes import LABEL_SETS, CLASS_INDEX
from lib.networks import BACKBONES, build_network
from lib.transforms.recipe import PRESETS


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_avg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


# --------------------------------------------------------------------------------------------
# engines


def _scorer(tmp: str, overlap: float, cache_dir=None):
    from testing.synthetic_weights import synthetic_registry

    from lib.importance.scorer import VolumeScorer

    recipe = PRESETS["recipe"].with_overrides(overlap=overlap)
    reg = synthetic_registry(tmp)
    return VolumeScorer(["segresnet"], reg, LABEL_SETS["atlas25"], recipe, device="cpu", cache_dir=cache_dir)


def _timed_rank(scorer, studies, out, engine=None):
    """(volumes, wall s, steady volumes/min between the first and the last finished volume)."""
    from lib.importance.rank import rank_folder

    t0 = time.perf_counter()
    records = rank_folder(scorer, studies, out, progress=False, engine=engine).records
    total = time.perf_counter() - t0
    parts = out + ".parts"  # one record file per volume, written as each volume finishes
    finished = sorted(os.stat(os.path.join(parts, f)).st_mtime for f in os.listdir(parts))
    n = len(records)
    steady = (n - 1) / (finished[-1] - finished[0]) * 60 if n > 1 and finished[-1] > finished[0] else float("nan")
    return n, total, steady


def _shape(text: str):
    """``128x128x96`` -> (128, 128, 96)."""
    return tuple(int(v) for v in text.split("x"))


def _ray_row(tmp: str, studies: str, args):
    """Score the folder on a local Ray with ``args.workers`` workers: one table row."""
    import ray

    from lib.importance.engines import RayEngine, init_ray

    t = time.perf_counter()
    init_ray(num_cpus=args.workers)
    ray_start = time.perf_counter() - t
    scorer = _scorer(tmp, args.overlap)
    n, total, steady = _timed_rank(scorer, studies, os.path.join(tmp, "ray.csv"), RayEngine(scorer, workers=args.workers))
    log(f"Ray: {n} volumes in {total:.1f} s (+ {ray_start:.1f} s to start Ray)")
    ray.shutdown()
    return ("Ray local", f"{args.workers} workers x 1 CPU", n, total + ray_start, steady, load_avg())


def engines(args) -> str:
    from testing.phantoms import make_phantom, write_phantom

    tmp = tempfile.mkdtemp(prefix="bench-scale-")
    studies = os.path.join(tmp, "studies")
    for i in range(args.volumes):
        write_phantom(make_phantom(200 + i, shape=_shape(args.shape), spacing_mm=(1.5, 1.5, 2.0)), studies, f"v{i:03d}", None)
    log(f"{args.volumes} phantoms in {studies}; load {load_avg()}")
    rows = []

    def inprocess(label):
        n, total, steady = _timed_rank(_scorer(tmp, args.overlap), studies, os.path.join(tmp, f"{label}.csv"))
        rows.append((f"in-process ({label})", f"{torch.get_num_threads()} torch threads", n, total, steady, load_avg()))
        log(f"in-process: {n} volumes in {total:.1f} s")

    # In-process before and after Ray: a shared CPU's load moves between runs, and the two bracket it.
    inprocess("before")
    if args.workers > 0:
        rows.append(_ray_row(tmp, studies, args))
    inprocess("after")
    # Pre-processing cache on a thin-slice CT (256x256x400 at 0.8x0.8x1 mm): round 1 fills, round 2 reads.
    ph = make_phantom(0, shape=_shape(args.cache_shape), spacing_mm=(0.8, 0.8, 1.0))
    big, _ = write_phantom(ph, os.path.join(tmp, "big"), "phantom_" + args.cache_shape, label_dir=None)
    cache = os.path.join(tmp, "cache")
    pre = {}
    for rnd in (1, 2):
        s = _scorer(tmp, args.overlap, cache_dir=cache)
        t = time.perf_counter()
        s.preprocess(big)
        pre[rnd] = time.perf_counter() - t
    uncached = _scorer(tmp, args.overlap)
    t = time.perf_counter()
    uncached.preprocess(big)
    pre[0] = time.perf_counter() - t
    shutil.rmtree(tmp, ignore_errors=True)

    facts = machine_facts(torch.device("cpu"))
    out = [
        f"- {facts['date']}; {facts['cpu']}; {facts['software']}",
        f"- {args.volumes} phantoms {args.shape} at 1.5x1.5x2 mm, SegResNet (synthetic weights), overlap"
        f" {args.overlap}, 25 organs; command `.venv/bin/python -m bench.bench_scale engines --volumes"
        f" {args.volumes} --workers {args.workers} --shape {args.shape} --cache-shape {args.cache_shape}`",
        "",
        "| engine | workers | volumes | wall s (incl. start) | volumes/min (wall) | volumes/min (steady) | load after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, workers, n, total, steady, load in rows:
        out.append(f"| {name} | {workers} | {n} | {total:.1f} | {n / total * 60:.1f} | {steady:.1f} | {load} |")
    out.append("")
    out.append(
        f"Pre-processing (load, RAS, 1.5 mm resample, HU window, crop) of a {args.cache_shape} CT at 0.8x0.8x1 mm:"
        f" {pre[0]:.2f} s without the cache, {pre[1]:.2f} s computing and writing the cache entry (round 1),"
        f" {pre[2]:.2f} s read back from it (round 2)."
    )
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# cost model


def window_cost(backbone: str, device: torch.device, channels: List[int], window: int = 96) -> Dict:
    from torch.utils.flop_counter import FlopCounterMode

    net = build_network(backbone).to(device).eval()
    x = torch.rand((1, 1, window, window, window), device=device)
    with torch.no_grad():
        net(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        counter = FlopCounterMode(display=False)
        with counter:
            net(x)
        flops = counter.get_total_flops()
        times = []
        for _ in range(3 if device.type == "cuda" else 1):
            t = time.perf_counter()
            torch.sigmoid(net(x)[:, channels].float())
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return {"flops": flops, "seconds": min(times)}


def attention_cost(grid, device: torch.device) -> float:
    from bench.bench_attention import make_input

    from lib.importance.attention import compute_attention

    names = LABEL_SETS["atlas25"]
    probs, masks = make_input(grid, len(names), 3, seed=0, layout="compact")
    probs, masks = probs.to(device), masks.to(device)
    t = time.perf_counter()
    compute_attention(probs, masks, names)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def cost(args) -> str:
    device = torch.device(args.device)
    grid = tuple(int(g) for g in args.grid.split("x"))
    channels = [CLASS_INDEX[n] - 1 for n in LABEL_SETS["atlas25"]]
    per = {}
    for b in args.backbones:
        log(f"{b}: one {args.window}^3 window on {device}")
        per[b] = window_cost(b, device, channels, args.window)
        log(f"{b}: {per[b]['flops'] / 1e12:.2f} TFLOP, {per[b]['seconds']:.2f} s")
    att = attention_cost(grid, device)
    log(f"attention 25 organs x 3 models on {grid}: {att:.1f} s")
    windows = {p: count_windows(grid, PRESETS[p]) for p in ("recipe", "fast")}
    lo, hi = (float(x) for x in args.gpu_tflops.split(","))
    on_gpu = device.type == "cuda"
    facts = machine_facts(device)
    out = [
        f"- {facts['date']}; {facts['device']}; {facts['cpu']}; {facts['software']}; load {load_avg()}",
        f"- command: `.venv/bin/python -m bench.bench_scale cost --device {args.device} --grid {args.grid}`",
        "",
        f"| backbone | TFLOP per {args.window}^3 window | s per window on this device |",
        "|---|---|---|",
    ]
    for b in args.backbones:
        out.append(f"| {b} | {per[b]['flops'] / 1e12:.3f} | {per[b]['seconds']:.2f} |")
    out += [
        "",
        f"Working grid {args.grid} (voxels at 1.5 mm after the foreground crop): {windows['recipe']} windows"
        f" at the recipe's overlap 0.75, {windows['fast']} at the fast preset's 0.5. Attention (25 organs x 3"
        f" backbones on that grid): {att:.1f} s on this device.",
        "",
    ]
    # Seconds per volume, three backbones: windows x per-window time + attention + host work.
    host = args.host_s
    rows = []
    for preset in ("recipe", "fast"):
        n_win = windows[preset]
        flops = sum(per[b]["flops"] for b in args.backbones) * n_win
        if on_gpu:
            gpu_s = [sum(per[b]["seconds"] for b in args.backbones) * n_win + att + host] * 2
            how = "measured per window on this GPU"
        else:
            # Projected: FLOPs at an assumed sustained throughput (low, high), attention assumed 0.5 s.
            gpu_s = [flops / (t * 1e12) + 0.5 + host for t in (hi, lo)]
            how = f"projected from FLOPs at {lo:g}-{hi:g} TFLOP/s sustained"
        cpu_s = sum(per[b]["seconds"] for b in args.backbones) * n_win + att + host
        rows.append((preset, n_win, flops, gpu_s, cpu_s, how))
    out += [
        f"Seconds per volume, all three backbones (+ attention + {host:g} s of host work: load, resample,"
        " post-processing, serial within a worker today; a worker that prefetched would hide it):",
        "",
        "| preset | windows | TFLOP per volume | s per volume, GPU | s per volume, this CPU |",
        "|---|---|---|---|---|",
    ]
    for preset, n_win, flops, gpu_s, cpu_s, how in rows:
        g = f"{gpu_s[0]:.1f}" if gpu_s[0] == gpu_s[1] else f"{gpu_s[0]:.1f}-{gpu_s[1]:.1f}"
        out.append(f"| {preset} | {n_win} x 3 | {flops / 1e12:.1f} | {g} ({how}) | {cpu_s:.0f} |")
    out += [
        "",
        "Projected wall time of one round's re-scoring (volumes x s per volume / GPUs; one Ray worker per GPU;"
        " assumes the pool is spread evenly and storage keeps up):",
        "",
        "| preset | volumes | 1 GPU | 8 GPUs | 64 GPUs |",
        "|---|---|---|---|---|",
    ]

    def fmt(s: float) -> str:
        return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"

    for preset, n_win, flops, gpu_s, cpu_s, how in rows:
        for vols in (1000, 9262):
            cells = []
            for g in (1, 8, 64):
                a, b2 = (vols * s / g for s in gpu_s)
                cells.append(fmt(a) if fmt(a) == fmt(b2) else f"{fmt(a)}-{fmt(b2)}")
            out.append(f"| {preset} | {vols} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("engines")
    e.add_argument("--volumes", type=int, default=8)
    e.add_argument("--workers", type=int, default=2, help="Ray workers (0: no Ray run)")
    e.add_argument("--overlap", type=float, default=0.0)
    e.add_argument("--shape", default="128x128x96", help="phantom size in voxels (1.5x1.5x2 mm)")
    e.add_argument("--cache-shape", default="256x256x400", help="the thin-slice CT of the cache timing (0.8x0.8x1 mm)")
    c = sub.add_parser("cost")
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--grid", default="256x192x256", help="working grid at 1.5 mm (default: a 384x288x384 mm body crop)")
    c.add_argument("--gpu-tflops", default="50,200", help="assumed sustained GPU TFLOP/s range (low,high) when not on a GPU")
    c.add_argument("--host-s", type=float, default=5.0, help="host-side seconds per volume (load, resample, post)")
    c.add_argument("--window", type=int, default=96, help="window edge of the per-window cost (the recipe's 96)")
    c.add_argument("--backbones", default=",".join(BACKBONES), help="comma list (a volume's cost counts these)")
    args = p.parse_args(argv)
    if args.cmd == "cost":
        args.backbones = [b for b in args.backbones.split(",") if b]
    text = engines(args) if args.cmd == "engines" else cost(args)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
