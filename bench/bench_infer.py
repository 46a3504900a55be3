"""Benchmark: seconds per volume through the real infer task, request in to label map out.

For each backbone (unet, swinunetr, segresnet) and the ``ensemble`` task (mean of all three), at the
"recipe" preset (overlap 0.75, sw_batch_size 1, fp32) and the "fast" preset (overlap 0.5,
sw_batch_size 16, bf16), on two inputs:

  ct   the shared real CT, ../shared/data/totalseg-example/ct.nii.gz (122x101x30 at 3 mm)
  big  a 256x256x400 synthetic abdominal CT at 0.8 x 0.8 x 1.0 mm (``testing.phantoms.make_phantom``
       seed 0, site A portal phase, rendered directly on that grid: a 205 x 205 x 400 mm field of
       view; int16 HU NIfTI written into the temp folder). It stands in for a thin-slice abdominal CT.
  any other value is taken as the path of an image file.

Each timed case calls the infer task exactly as the server does (``task({"image": path, ...})``):
pre-processing, sliding window, post-processing (threshold, largest component), resampling back to
the input grid and writing the NIfTI label map; the table reports the request's total and the
inferer part of ``result_json["latencies"]``. The weights are synthetic checkpoints in the released
format (testing/synthetic_weights.py): network speed does not depend on the values, but the post-processing
(largest connected component) does depend on the masks they produce.

Where a case would take too long (its projected time x --repeat over --max-seconds, or past the
--total-seconds target of the whole run), it is not run; instead its time is *projected*:
N windows x seconds per window (measured on a few 96^3 forward passes at the preset's sw_batch_size
and amp) + the sliding window's own overhead (one pass over the working grid with a do-nothing network:
patching, gaussian blending, aggregation, sigmoid), per backbone, + the non-inferer seconds measured
on the same input by full runs (pre, invert, post, write). N is the number of windows MONAI's sliding
window runs on the working grid (the shape after the recipe's pre-processing, obtained by running the
pre-transforms once). Full runs are done cheapest first; the budget estimates are scaled by the worst
measured/projected ratio seen so far (a shared CPU can make a run several times slower than its
projection). A full run also counts the windows the networks really saw and compares its inferer time
with the projection, in wall-clock and in this process's CPU seconds (the latter moves much less with
other jobs' load), which checks the projection model. The defaults (300 s per case, 900 s in all)
aim at a CPU run of about 15 minutes; on a GPU every case fits and is measured.

Untimed warm-up before any timing: one request on a tiny phantom (pays the libraries' first-use
costs, e.g. ITK's lazy loading in the NIfTI writer, ~5 s here), then one 96^3 window per backbone (on
CUDA one per backbone and preset); model loading (build + checkpoint load + move to device) is timed
separately and reported apart.

    python -m bench.bench_infer                                # CPU, all cases, budgets below
    python -m bench.bench_infer --device cuda --repeat 3       # GPU run (everything measured)
    python -m bench.bench_infer --backbones segresnet --presets fast --inputs ct --out bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from bench.machine import machine_facts
from lib.app import build_tasks
from lib.networks.inference import autocast
from lib.networks import BACKBONES
from lib.transforms.recipe import PRESETS, Recipe
from lib.weights import RELEASED_FILES

ROOT = Path(__file__).resolve().parents[1]

SHARED_CT = ROOT.parent / "shared" / "data" / "totalseg-example" / "ct.nii.gz"
BIG_SHAPE = (256, 256, 400)
BIG_SPACING = (0.8, 0.8, 1.0)
GPU_TARGET_S = 5.0  # ensemble (3 backbones), fast preset, big input, one H100/H200, request to label map

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Facts and inputs


def load_avg() -> Tuple[float, float, float]:
    return os.getloadavg()


def fmt_load(la) -> str:
    return ", ".join(f"{x:.2f}" for x in la)


@dataclass
class Input:
    name: str
    path: str
    shape: Tuple[int, ...] = ()
    spacing: Tuple[float, ...] = ()
    grid: Tuple[int, ...] = ()  # working grid after the recipe's pre-processing
    pre_s: float = 0.0  # first, standalone run of the pre-transforms
    what: str = ""


def make_big_input(folder: str) -> str:
    from testing.phantoms import make_phantom, write_phantom

    ph = make_phantom(0, shape=BIG_SHAPE, spacing_mm=BIG_SPACING)
    path, _ = write_phantom(ph, folder, "phantom_256x256x400", label_dir=None)
    return path


def prepare_input(name: str, folder: str) -> Input:
    import nibabel as nib

    if name == "ct":
        if not SHARED_CT.exists():
            raise SystemExit(f"shared CT not found: {SHARED_CT}")
        inp = Input(name, str(SHARED_CT), what="shared real CT (TotalSegmentator example)")
    elif name == "big":
        t = time.perf_counter()
        inp = Input(name, make_big_input(folder), what=f"synthetic phantom seed 0, {BIG_SPACING} mm")
        log(f"phantom {BIG_SHAPE} written in {time.perf_counter() - t:.1f} s")
    else:
        inp = Input(os.path.basename(name), os.path.abspath(name), what="file")
    if os.path.isfile(inp.path):
        img = nib.load(inp.path)
        inp.shape = tuple(int(s) for s in img.shape[:3])
        inp.spacing = tuple(round(float(z), 3) for z in img.header.get_zooms()[:3])
    return inp


def warmup_request(task, folder: str, device: str) -> Dict[str, float]:
    """One untimed request on a tiny phantom (one sliding window): the libraries' first-use costs
    (ITK's lazy loading in the NIfTI writer, the connected-component code, ...) are paid here, as a
    server pays them on its first request, and not by whichever case is timed first."""
    from testing.phantoms import make_phantom, write_phantom

    path, _ = write_phantom(make_phantom(1, shape=(32, 32, 24), spacing_mm=(3.0, 3.0, 3.0)), folder, "warmup",
                            label_dir=None)
    label_file, result = task({"image": path, "device": device, "logging": "WARNING"})
    os.remove(label_file)
    return {k: float(v) for k, v in result["latencies"].items() if isinstance(v, (int, float))}


def working_grid(task, inp: Input) -> None:
    """Run the task's own pre-transforms once: the working-grid shape the sliding window sees."""
    t = time.perf_counter()
    data = task.run_pre_transforms({"image": inp.path, "logging": "WARNING"}, task.pre_transforms())
    inp.pre_s = time.perf_counter() - t
    img = data["image"]
    inp.grid = tuple(int(s) for s in img.shape[1:])
    if not inp.shape:
        inp.shape = tuple(int(s) for s in np.asarray(img.meta["spatial_shape"]).ravel())


def count_windows(grid, recipe: Recipe) -> int:
    """Windows MONAI's sliding_window_inference runs on one image of spatial shape ``grid``.

    Same rules as MONAI: the image is padded up to the ROI where smaller; the step along an axis is
    int(roi * (1 - overlap)) (at least 1), or the ROI itself where the image equals it; the patch
    starts come from ``monai.data.utils.dense_patch_slices``.
    """
    from monai.data.utils import dense_patch_slices

    roi = tuple(int(r) for r in recipe.roi)
    size = tuple(max(int(g), r) for g, r in zip(grid, roi))
    step = tuple(r if s == r else max(int(r * (1 - recipe.overlap)), 1) for s, r in zip(size, roi))
    return len(dense_patch_slices(size, roi, step))


# --------------------------------------------------------------------------------------------
# Timing helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_window(net, channels, recipe: Recipe, device: torch.device, batch: int) -> None:
    x = torch.rand((batch, 1) + tuple(recipe.roi), device=device)
    with torch.no_grad(), autocast(device, recipe.amp):
        y = net(x)[:, channels]
        torch.sigmoid(y.float())
    sync(device)


@dataclass
class WindowTime:
    s_per_batch: float  # wall clock
    cpu_per_batch: float  # CPU seconds of this process (all threads)
    batch: int
    passes: int

    @property
    def s_per_window(self) -> float:
        return self.s_per_batch / self.batch

    @property
    def cpu_per_window(self) -> float:
        return self.cpu_per_batch / self.batch


def time_windows(net, channels, recipe: Recipe, device, max_passes: int, cap_s: float) -> WindowTime:
    """Mean time of forward passes of sw_batch_size 96^3 windows (at least one, then until cap_s)."""
    times: List[float] = []
    cpu: List[float] = []
    while len(times) < max_passes and (not times or sum(times) < cap_s):
        t, c = time.perf_counter(), time.process_time()
        forward_window(net, channels, recipe, device, recipe.sw_batch_size)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return WindowTime(statistics.mean(times), statistics.mean(cpu), recipe.sw_batch_size, len(times))


class NullNet(torch.nn.Module):
    """Stands in for a network in the sliding window: 32 output channels of zeros, no compute."""

    def forward(self, x):
        return torch.zeros((x.shape[0], 32) + tuple(x.shape[2:]), device=x.device, dtype=x.dtype)


def time_sliding_overhead(grid, recipe: Recipe, device, channels) -> Tuple[float, float]:
    """Seconds of one sliding-window pass over ``grid`` without the network (patching, gaussian
    blending, aggregation, sigmoid): what a projection adds to N windows x s/window, per backbone.
    Returns (wall seconds, CPU seconds)."""
    from lib.networks.inference import sliding_window_probs

    image = torch.rand((1,) + tuple(grid))
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    sliding_window_probs(NullNet(), image, recipe, device, channels)
    sync(device)
    return time.perf_counter() - t, time.process_time() - c


class WindowCounter:
    """Forward pre-hooks on the networks: how many windows each one saw during a request."""

    def __init__(self, nets: Dict[str, torch.nn.Module]):
        self.counts = {b: 0 for b in nets}
        self.handles = [n.register_forward_pre_hook(self._hook(b)) for b, n in nets.items()]

    def _hook(self, b):
        def hook(_module, args):
            self.counts[b] += int(args[0].shape[0])

        return hook

    def reset(self):
        for b in self.counts:
            self.counts[b] = 0

    def close(self):
        for h in self.handles:
            h.remove()


@dataclass
class Case:
    inp: Input
    model: str  # a backbone or "ensemble"
    preset: str
    windows: int
    backbones: List[str]
    proj_infer: float = 0.0  # (N windows x s/window + sliding-window overhead), summed over the backbones
    proj_cpu: float = 0.0  # the same in CPU seconds
    runs: List[Dict] = field(default_factory=list)  # measured latencies, one dict per repeat
    counted: Optional[Dict[str, int]] = None
    skipped: str = ""  # why it was projected instead of run

    @property
    def measured(self) -> bool:
        return bool(self.runs)

    def med(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs)

    def other(self) -> float:
        return self.med("total") - self.med("infer")


# --------------------------------------------------------------------------------------------


def parse_list(s: str, allowed=None) -> List[str]:
    items = [x.strip() for x in s.split(",") if x.strip()]
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise SystemExit(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backbones", default="unet,swinunetr,segresnet,ensemble",
                    help="comma list of unet, swinunetr, segresnet, ensemble (all three averaged)")
    ap.add_argument("--presets", default="recipe,fast", help=f"comma list of {', '.join(PRESETS)}")
    ap.add_argument("--inputs", default="ct,big", help="comma list: ct, big, or image file paths")
    ap.add_argument("--repeat", type=int, default=1, help="timed requests per measured case (median reported)")
    ap.add_argument("--max-seconds", type=float, default=300.0,
                    help="per case: run it for real only if projected seconds x repeat fit; else project it")
    ap.add_argument("--total-seconds", type=float, default=900.0,
                    help="target wall time of the whole benchmark (0 = none): full runs that would go past it "
                    "are projected instead (cases are run cheapest first)")
    ap.add_argument("--window-passes", type=int, default=3,
                    help="at most this many timed forward passes per backbone and preset (fewer once 20 s spent)")
    ap.add_argument("--out", default=None, help="append the markdown report to this file (always printed)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (checkpoints, phantom)")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    for name in ("monailabel", "lib", "monai"):
        logging.getLogger(name).setLevel(logging.WARNING)

    models = parse_list(args.backbones, list(BACKBONES) + ["ensemble"])
    presets = parse_list(args.presets, list(PRESETS))
    inputs = parse_list(args.inputs)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    from monailabel.utils.others.generic import name_to_device

    device = torch.device(name_to_device(args.device))  # the device the infer task itself will use
    needed = [b for b in BACKBONES if b in models or "ensemble" in models]

    facts = machine_facts(device)
    load_before = load_avg()
    log(f"{facts['device']}; load average {fmt_load(load_before)}")

    tmp = tempfile.mkdtemp(prefix="bench_infer_")
    try:
        report = run(args, models, presets, inputs, needed, device, tmp, facts, load_before)
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n")
        log(f"appended to {args.out}")
    return 0


def run(args, models, presets, inputs, needed, device, tmp, facts, load_before) -> str:
    tasks, sizes = build_app_tasks(needed, tmp)
    any_task = tasks.infers[needed[0]]
    channels = any_task.backbones.channels
    ins = prepare_inputs(any_task, inputs, tmp)
    nets, load_s, warm_req = load_and_warm(args, tasks, needed, presets, channels, device, tmp)
    wt = time_all_windows(args, nets, needed, presets, channels, device)
    cases, sw_over, sw_cpu = project_cases(ins, models, needed, presets, wt, device, channels)
    run_cases(args, tasks, nets, cases)
    load_after = load_avg()
    return render(args, facts, load_before, load_after, ins, presets, needed, sizes, load_s, wt, sw_over, sw_cpu,
                  cases, device, warm_req)


def build_app_tasks(needed: List[str], tmp: str):
    """The app's tasks, built by the app's own code from a conf, on synthetic released-format weights;
    and each checkpoint's size (MiB)."""
    from testing.synthetic_weights import write_synthetic_checkpoint

    wdir = os.path.join(tmp, "weights")
    sizes = {}
    for b in needed:
        p = write_synthetic_checkpoint(b, os.path.join(wdir, RELEASED_FILES[b]))
        sizes[b] = os.path.getsize(p) / 2**20
    tasks = build_tasks(
        os.path.join(tmp, "app"),
        os.path.join(tmp, "studies"),
        {
            "models": ",".join(needed),
            "weights_dir": wdir,
            "use_pretrained_model": "false",
            "hf_endpoint": "http://127.0.0.1:9",  # never the internet
        },
    )
    return tasks, sizes


def prepare_inputs(any_task, inputs: List[str], tmp: str) -> List[Input]:
    """The inputs and their working grids."""
    ins: List[Input] = []
    for name in inputs:
        inp = prepare_input(name, os.path.join(tmp, "inputs"))
        working_grid(any_task, inp)
        log(f"input {inp.name}: {inp.shape} at {inp.spacing} mm -> working grid {inp.grid} "
            f"(pre-transforms {inp.pre_s:.1f} s, first run)")
        ins.append(inp)
    return ins


def load_and_warm(args, tasks, needed, presets, channels, device, tmp):
    """Model loading (build + load checkpoint + to device), timed, then the untimed warm-up: the networks,
    the seconds each took to load, and (backbone, latencies) of the warm-up request."""
    load_s: Dict[str, float] = {}
    nets: Dict[str, torch.nn.Module] = {}
    for b in needed:
        sync(device)
        t = time.perf_counter()
        nets[b] = tasks.cache.get(b, tasks.registry.current_path(b), device)
        sync(device)
        load_s[b] = time.perf_counter() - t
        log(f"loaded {b} in {load_s[b]:.2f} s")
    first = "segresnet" if "segresnet" in needed else needed[0]  # the cheapest network
    warm_req = warmup_request(tasks.infers[first], os.path.join(tmp, "inputs"), args.device)
    log(f"warm-up request ({first}, tiny phantom): total {warm_req['total']:.1f} s (pre {warm_req['pre']:.1f}, "
        f"infer {warm_req['infer']:.1f}, post {warm_req['post']:.1f}, write {warm_req['write']:.1f})")
    warm = [(b, p) for b in needed for p in presets] if device.type == "cuda" else [(b, presets[0]) for b in needed]
    for b, p in warm:
        r = PRESETS[p]
        t = time.perf_counter()
        forward_window(nets[b], channels, r, device, r.sw_batch_size if device.type == "cuda" else 1)
        log(f"warm-up {b} ({p}) {time.perf_counter() - t:.1f} s")
    return nets, load_s, (first, warm_req)


def time_all_windows(args, nets, needed, presets, channels, device) -> Dict[Tuple[str, str], WindowTime]:
    """Seconds per window, per backbone and preset."""
    wt: Dict[Tuple[str, str], WindowTime] = {}
    for b in needed:
        for p in presets:
            wt[b, p] = time_windows(nets[b], channels, PRESETS[p], device, args.window_passes, cap_s=20.0)
            w = wt[b, p]
            log(f"window {b} {p}: {w.s_per_batch:.2f} s per batch of {w.batch} ({w.s_per_window:.2f} s/window, "
                f"{w.passes} passes)")
    return wt


def project_cases(ins, models, needed, presets, wt, device, channels):
    """The cases, each with its projected inferer time (wall clock and CPU), and the sliding-window
    overhead without a network per (input, preset), wall clock and CPU."""
    cases: List[Case] = []
    sw_over: Dict[Tuple[str, str], float] = {}
    sw_cpu: Dict[Tuple[str, str], float] = {}
    for inp in ins:
        for p in presets:
            n = count_windows(inp.grid, PRESETS[p])
            sw_over[inp.name, p], sw_cpu[inp.name, p] = time_sliding_overhead(inp.grid, PRESETS[p], device, channels)
            log(f"sliding-window overhead {inp.name} {p}: {n} windows, {sw_over[inp.name, p]:.2f} s without a network")
            for m in models:
                bbs = needed if m == "ensemble" else [m]
                c = Case(inp, m, p, n, bbs)
                c.proj_infer = sum(n * wt[b, p].s_per_window + sw_over[inp.name, p] for b in bbs)
                c.proj_cpu = sum(n * wt[b, p].cpu_per_window + sw_cpu[inp.name, p] for b in bbs)
                cases.append(c)
    return cases, sw_over, sw_cpu


def skip_reason(args, c: Case, cases: List[Case]) -> str:
    """Why a case is not run (its estimate passes a budget), or ''. Non-inferer seconds come from earlier
    full runs on this input where there are some. Under a shared CPU a full run can take several times its
    projection: scaled by the worst measured/projected inferer ratio seen so far, so that the budgets hold."""
    done = [d.other() for d in cases if d.inp is c.inp and d.measured]
    slow = max([1.0] + [d.med("infer") / d.proj_infer for d in cases if d.measured and d.proj_infer > 0])
    est = (c.proj_infer * slow + (max(done) if done else c.inp.pre_s)) * args.repeat
    elapsed = time.perf_counter() - T0
    if est > args.max_seconds:
        return f"estimated {est:.0f} s > --max-seconds {args.max_seconds:.0f}"
    if args.total_seconds and elapsed + est > args.total_seconds:
        return f"would end past --total-seconds {args.total_seconds:.0f} (at {elapsed + est:.0f} s)"
    return ""


def run_cases(args, tasks, nets, cases: List[Case]) -> None:
    """Full runs through the infer tasks, cheapest first, within the budgets; each case keeps its runs'
    latencies and the windows each network saw."""
    counter = WindowCounter(nets)
    try:
        for c in sorted(cases, key=lambda c: c.proj_infer + c.inp.pre_s):
            c.skipped = skip_reason(args, c, cases)
            if c.skipped:
                log(f"skip {c.inp.name} {c.model} {c.preset}: {c.skipped}")
                continue
            r = PRESETS[c.preset]
            req = {"image": c.inp.path, "device": args.device, "overlap": r.overlap,
                   "sw_batch_size": r.sw_batch_size, "amp": r.amp, "logging": "WARNING"}
            for i in range(args.repeat):
                counter.reset()
                marks: Dict[str, float] = {}
                t, cpu0 = time.perf_counter(), time.process_time()
                label_file, result = tasks.infers[c.model](dict(req), cpu_marks(marks))
                wall, cpu = time.perf_counter() - t, time.process_time() - cpu0
                lat = {k: float(v) for k, v in result["latencies"].items() if isinstance(v, (int, float))}
                lat["wall"] = wall
                lat["cpu_total"] = cpu
                lat["cpu_infer"] = marks["infer"] - marks["pre"]
                check_label(label_file, c.inp)
                os.remove(label_file)
                c.runs.append(lat)
                c.counted = {b: counter.counts[b] for b in c.backbones}
                log(f"run {c.inp.name} {c.model} {c.preset} #{i + 1}: total {lat['total']:.1f} s "
                    f"(pre {lat['pre']:.1f}, infer {lat['infer']:.1f}, post {lat['post']:.1f}, "
                    f"write {lat['write']:.1f}); windows seen {c.counted}")
    finally:
        counter.close()


def cpu_marks(marks: Dict[str, float]) -> Dict:
    """Infer-task callbacks that note the process CPU time at the end of the pre-transforms and of the
    inferer, so that the inferer's CPU seconds can be told apart (the task's latencies are wall clock)."""
    from monailabel.tasks.infer.basic_infer import CallBackTypes

    def mark(name):
        def cb(data):
            marks[name] = time.process_time()
            return data

        return cb

    return {CallBackTypes.PRE_TRANSFORMS: mark("pre"), CallBackTypes.INFERER: mark("infer")}


def check_label(label_file: str, inp: Input) -> None:
    import nibabel as nib

    shape = tuple(int(s) for s in nib.load(label_file).shape[:3])
    if inp.shape and shape != tuple(inp.shape):
        raise RuntimeError(f"label map {shape} is not on the input grid {inp.shape}")


# --------------------------------------------------------------------------------------------
# Report


def fmt_shape(s) -> str:
    return "x".join(str(int(v)) for v in s)


def render(args, facts, load_before, load_after, ins, presets, needed, sizes, load_s, wt, sw_over, sw_cpu,
           cases, device, warm_req) -> str:
    L = render_header(facts, load_before, load_after, ins)
    L += render_cases(cases, ins, wt, sw_over, device)
    L += render_target_and_warmup(cases, facts, device, warm_req)
    L += render_windows(ins, presets, needed, sizes, load_s, wt, sw_over, sw_cpu)
    L += render_projection_check(cases)
    return "\n".join(L)


def render_header(facts, load_before, load_after, ins) -> List[str]:
    """The run's command, machine, load and inputs."""
    L: List[str] = []
    L.append(f"### bench_infer.py run, {facts['date']}")
    L.append("")
    L.append(f"- command: `python -m bench.bench_infer {' '.join(sys.argv[1:])}`".replace("  ", " "))
    L.append(f"- machine: {facts['cpu']}")
    L.append(f"- device: {facts['device']}")
    L.append(f"- software: {facts['software']}")
    ncpu = os.cpu_count() or 1
    busy = max(load_before[0], load_after[0], load_after[1]) > ncpu
    L.append(f"- load average (1, 5, 15 min) before: {fmt_load(load_before)}; after: {fmt_load(load_after)}"
             + (f" -- **above the {ncpu} CPUs: other jobs shared the machine, times are under load**" if busy else ""))
    L.append("- weights: synthetic checkpoints in the released format (speed does not depend on the values; "
             "the largest-component post-processing does depend on the masks they give)")
    for inp in ins:
        L.append(f"- input `{inp.name}`: {inp.what}, {fmt_shape(inp.shape)} at {inp.spacing} mm -> working grid "
                 f"{fmt_shape(inp.grid)} at 1.5 mm after RAS/spacing/window/foreground crop")
    L.append("")
    return L


def render_cases(cases, ins, wt, sw_over, device) -> List[str]:
    """One row per case: measured, or projected from the seconds per window."""
    L: List[str] = []
    # Non-inferer seconds per input, from the full runs on it (median over them).
    other: Dict[str, Optional[float]] = {}
    for inp in ins:
        vals = [c.other() for c in cases if c.inp is inp and c.measured]
        other[inp.name] = statistics.median(vals) if vals else None

    L.append("| input | shape | working grid | windows | backbone | preset | device | seconds (total) "
             "| inferer s | other s (pre / post / write) |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for c in cases:
        rcp = PRESETS[c.preset]
        tag = f"{c.preset} (ov {rcp.overlap}, bs {rcp.sw_batch_size}, {rcp.amp if rcp.amp != 'none' else 'fp32'})"
        win = f"{c.windows}" if c.model != "ensemble" else f"{len(c.backbones)} x {c.windows}"
        head = f"| {c.inp.name} | {fmt_shape(c.inp.shape)} | {fmt_shape(c.inp.grid)} | {win} | {c.model} | {tag} | {device.type} "
        if c.measured:
            rep = f" (median of {len(c.runs)})" if len(c.runs) > 1 else ""
            L.append(head + f"| **{c.med('total'):.1f}** measured{rep} | {c.med('infer'):.1f} | "
                     f"{c.other():.1f} ({c.med('pre'):.1f} / {c.med('post'):.1f} / {c.med('write'):.1f}) |")
        else:
            o = other[c.inp.name]
            o_txt = f"{o:.1f} (measured on this input)" if o is not None else f"{c.inp.pre_s:.1f} (pre only; post/write not measured)"
            base = o if o is not None else c.inp.pre_s
            sw = sw_over[c.inp.name, c.preset]
            if c.model == "ensemble":
                parts = " + ".join(f"{c.windows} x {wt[b, c.preset].s_per_window:.2f}" for b in c.backbones)
                how = f"projected ({parts} s/window; + {len(c.backbones)} x {sw:.1f} s sliding-window overhead)"
            else:
                how = (f"projected ({c.windows} windows x {wt[c.model, c.preset].s_per_window:.2f} s/window"
                       f" + {sw:.1f} s sliding-window overhead)")
            L.append(head + f"| ~{c.proj_infer + base:.0f} {how} | ~{c.proj_infer:.0f} | {o_txt} |")
    L.append("")

    return L


def render_target_and_warmup(cases, facts, device, warm_req) -> List[str]:
    """The GPU target's verdict, and the untimed warm-up."""
    L: List[str] = []
    # The GPU target.
    tgt = [c for c in cases if c.model == "ensemble" and c.preset == "fast" and c.inp.name == "big"]
    if tgt:
        c = tgt[0]
        if device.type == "cuda" and c.measured:
            ok = "MET" if c.med("total") < GPU_TARGET_S else "NOT MET"
            L.append(f"GPU target (ensemble, fast, 256x256x400, < {GPU_TARGET_S:.0f} s request to label map): "
                     f"{c.med('total'):.2f} s on {facts['device']}: **{ok}**")
        else:
            L.append(f"GPU target (ensemble, fast, 256x256x400, < {GPU_TARGET_S:.0f} s request to label map on one "
                     f"H100/H200): not measurable on this {device.type} run")
        L.append("")

    wb, wl = warm_req
    L.append(f"Untimed warm-up before any timing: one request with {wb} on a tiny phantom (one window; pays the "
             f"libraries' first-use costs, e.g. ITK loading in the writer): total {wl['total']:.1f} s (pre {wl['pre']:.1f}, "
             f"infer {wl['infer']:.1f}, post {wl['post']:.1f}, write {wl['write']:.1f}); then one window per backbone"
             + (" and preset" if device.type == "cuda" else "") + ".")
    L.append("")
    return L


def render_windows(ins, presets, needed, sizes, load_s, wt, sw_over, sw_cpu) -> List[str]:
    """Model loading and seconds per window; the sliding-window overhead without a network."""
    L: List[str] = []
    L.append("Model loading (build + load checkpoint + move to device; not in the times above) and seconds per "
             "96^3 window:")
    L.append("")
    L.append("| backbone | checkpoint MiB | load s | " + " | ".join(
        f"{p}: s/window [CPU s] (batch of {PRESETS[p].sw_batch_size}, passes)" for p in presets) + " |")
    L.append("|---|---|---|" + "---|" * len(presets))
    for b in needed:
        cells = [f"{wt[b, p].s_per_window:.2f} [{wt[b, p].cpu_per_window:.2f}] ({wt[b, p].s_per_batch:.2f} per batch, "
                 f"{wt[b, p].passes})" for p in presets]
        L.append(f"| {b} | {sizes[b]:.0f} | {load_s[b]:.2f} | " + " | ".join(cells) + " |")
    L.append("")

    L.append("Sliding-window overhead without a network (patching, gaussian blending, aggregation, sigmoid), "
             "per backbone pass; part of every projection:")
    L.append("")
    L.append("| input | " + " | ".join(f"{p}: windows, s [CPU s]" for p in presets) + " |")
    L.append("|---|" + "---|" * len(presets))
    for inp in ins:
        L.append(f"| {inp.name} | " + " | ".join(
            f"{count_windows(inp.grid, PRESETS[p])}, {sw_over[inp.name, p]:.2f} [{sw_cpu[inp.name, p]:.2f}]"
            for p in presets) + " |")
    L.append("")

    return L


def render_projection_check(cases) -> List[str]:
    """The projection checked against the measured cases."""
    L: List[str] = []
    checks = [c for c in cases if c.measured]
    if checks:
        L.append("Projection check on the measured cases (windows the networks saw; inferer measured vs "
                 "N windows x s/window + sliding-window overhead, in wall-clock and in this process's CPU seconds; "
                 "under a shared CPU the wall-clock ratio moves with the other jobs' load, the CPU one much less):")
        L.append("")
        L.append("| input | backbone | preset | windows computed / seen | inferer s measured / projected (ratio) "
                 "| inferer CPU s measured / projected (ratio) | request CPU s |")
        L.append("|---|---|---|---|---|---|---|")
        for c in checks:
            seen = sum((c.counted or {}).values())
            expect = c.windows * len(c.backbones)
            flag = "" if seen == expect else " **MISMATCH**"
            L.append(f"| {c.inp.name} | {c.model} | {c.preset} | {expect} / {seen}{flag} "
                     f"| {c.med('infer'):.1f} / {c.proj_infer:.1f} ({c.med('infer') / c.proj_infer:.2f}) "
                     f"| {c.med('cpu_infer'):.1f} / {c.proj_cpu:.1f} ({c.med('cpu_infer') / c.proj_cpu:.2f}) "
                     f"| {c.med('cpu_total'):.1f} |")
        L.append("")
    return L

if __name__ == "__main__":
    sys.exit(main())
