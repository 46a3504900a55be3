"""Benchmark: seconds per fine-tuning iteration per backbone and precision, and one whole round.

Part 1, training iterations. For each backbone (segresnet, unet, swinunetr) a plain torch loop does
what one iteration of the train task does (MONAI's ``SupervisedTrainer._iteration`` as driven by
``lib.trainers.segmentation.SuPreMTrainer``): ``zero_grad`` (set_to_none=False, MONAI's default),
forward of a batch of 2 random 96^3 crops (what ``num_samples=2`` with batch size 1 gives), the
trainer's own loss (``lib.trainers.segmentation.fine_tuning_loss``: sigmoid Dice + BCE per channel
on the 25 atlas25 channels of the 32 outputs) ``.mean()``, backward, and the trainer's own optimizer
(``fine_tuning_optimizer``: AdamW lr 1e-4, weight decay 1e-5) step. Network, loss and optimizer
come from lib; nothing is re-implemented. Inputs are uniform 0..1 intensities and a sparse random
binary target (speed does not depend on the values); the weights are the random initialisation.

Precisions:
  fp32   no autocast (what the train task runs on a CPU, whatever ``train_amp`` says).
  bf16   ``torch.autocast(<device>, dtype=bfloat16)``. On CUDA with a GradScaler, as the train task
         does (MONAI creates a GradScaler whenever amp is on, for bf16 too). On a CPU there is no
         scaler; the train task does not use autocast on a CPU, so this row says what it *would* give.
  fp16   CUDA only: autocast float16 + GradScaler (``--conf train_amp fp16``). Steps the scaler skips
         (inf/nan gradients; usual in the first iterations) are counted and reported.

The precisions of a backbone share one network and optimizer and are interleaved: one untimed
warm-up iteration per precision, then timed iterations round-robin (fp32, bf16, [fp16], fp32, ...),
so a slow spell on a shared machine hits every precision alike. The table reports the median of the
timed iterations. ``--budget-s`` bounds part 1: each backbone gets an equal share of what is left;
from the warm-up times the number of timed iterations is cut to fit the share (reported as "timed"
below ``--iters``). Backbones in ``--small-first`` (default on a CPU: unet and swinunetr, whose 96^3
iteration can take minutes there) are measured at ``--fallback-roi`` (64^3) first, and at ``--roi`` only if
the 64^3 times scaled by voxel count say that a warm-up and one timed iteration per precision fit
the rest of its share; otherwise that projection is printed, marked as not measured. Without it,
``--roi`` is measured directly; if not even one timed round-robin fits, the warm-up time is reported
(marked: it includes first-call overheads) and the backbone is also measured at ``--fallback-roi``.

Part 2, one whole active-learning round on the app's own code: ``lib.app.build_tasks`` (models
segresnet, synthetic released weights, ``train_roi`` 64, ``train_epochs`` 2, ``train_num_samples`` 2,
``val_fraction`` 0.4 (3 train / 1 validation image), overlap 0 for scoring) over a folder of 8 phantom studies (4 with final labels),
MONAI Label's LocalDatastore, ``tasks.start_rounds`` and ``tasks.rounds.trigger(..., wait=True)``. It
reports the round's seconds from the round log, the train task's own seconds from the published
sidecar JSON, the re-scoring seconds (the importance scoring task timed by a wrapper) and the rest
(ranking, log, bookkeeping).

    python -m bench.bench_train                                   # CPU: all backbones + a round
    python -m bench.bench_train --device cuda --iters 10          # GPU run (fp32, bf16, fp16)
    python -m bench.bench_train --backbones segresnet --iters 3 --skip-round
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from bench.machine import machine_facts
from lib.classes import CLASS_INDEX, LABEL_SETS
from lib.networks import BACKBONES, build_network
from lib.trainers.segmentation import fine_tuning_loss, fine_tuning_optimizer

LABELS = "atlas25"
OUT_CHANNELS = 32
BATCH = 2  # num_samples=2 crops of one image, batch size 1
ROUND_CONF = {
    "models": "segresnet",
    "use_pretrained_model": "false",
    "overlap": "0",
    "train_roi": "64",
    "train_epochs": "2",
    "train_num_samples": "2",
    "val_fraction": "0.4",  # with these names: 3 train, 1 validation image
}
ROUND_STUDIES = 8
ROUND_LABELLED = 4
# Phantom grid for the round: 64 x 64 x 48 voxels at 2.25 x 2.25 x 3 mm = 144 mm cube, i.e. a 96^3
# working grid at the recipe's 1.5 mm (before the foreground crop): one 96^3 scoring window each.
ROUND_SHAPE = (64, 64, 48)
ROUND_SPACING = (2.25, 2.25, 3.0)

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def load_avg() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def bench_facts(device: torch.device) -> Dict[str, str]:
    facts = machine_facts(device)
    facts["load average (1/5/15 min) at start"] = load_avg()
    return facts


# --------------------------------------------------------------------------------------------
# Part 1: one training iteration


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Case:
    """One precision of one backbone: the autocast context, the scaler, the timings."""

    def __init__(self, name: str, device: torch.device):
        self.name = name
        self.device = device
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        # As MONAI's SupervisedTrainer: a GradScaler whenever amp is on (CUDA only in the train task).
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and self.dtype is not None else None
        self.warmup_s: Optional[float] = None
        self.times: List[float] = []
        self.skipped = 0  # optimizer steps the GradScaler skipped in timed iterations
        self.peak_mb: Optional[float] = None
        self.loss: Optional[float] = None

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def one_iteration(net, loss_fn, opt, case: Case, x, y) -> float:
    """One train-task iteration (see the module docstring); returns wall seconds."""
    dev = case.device
    _sync(dev)
    t = time.perf_counter()
    net.train()
    opt.zero_grad(set_to_none=False)
    with case.autocast():
        pred = net(x)
        loss = loss_fn(pred, y).mean()
    if case.scaler is not None:
        case.scaler.scale(loss).backward()
        before = case.scaler.get_scale()
        case.scaler.step(opt)
        case.scaler.update()
        skipped = case.scaler.get_scale() < before
    else:
        loss.backward()
        opt.step()
        skipped = False
    _sync(dev)
    dt = time.perf_counter() - t
    case._last_skipped = skipped
    case.loss = float(loss.detach())
    return dt


def bench_backbone(backbone: str, roi: int, modes: List[str], iters: int, share_s: float, device, channels, seed=0):
    """Warm up every precision once, then round-robin timed iterations within ``share_s`` seconds.

    A precision whose warm-up would start after the share is spent (judged by the fp32 warm-up) is
    left out; the timed iterations are cut to what the warm-ups say fits."""
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    net = build_network(backbone, OUT_CHANNELS).to(device)
    loss_fn, opt = fine_tuning_loss(channels), fine_tuning_optimizer(net)  # the train task's own
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((BATCH, 1, roi, roi, roi), generator=g).to(device)
    y = (torch.rand((BATCH, len(channels), roi, roi, roi), generator=g) < 0.05).float().to(device)
    cases = []
    for m in modes:
        if cases and time.perf_counter() - t_start + cases[0].warmup_s > share_s:
            log(f"  {backbone} {roi}^3 {m}: left out, its warm-up would overrun the share ({share_s:.0f} s)")
            continue
        c = Case(m, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        c.warmup_s = one_iteration(net, loss_fn, opt, c, x, y)
        if device.type == "cuda":
            c.peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        log(f"  {backbone} {roi}^3 {c.name}: warm-up iteration {c.warmup_s:.2f} s (loss {c.loss:.4f})")
        cases.append(c)
    per_round = sum(c.warmup_s for c in cases)
    left = share_s - (time.perf_counter() - t_start)
    n = max(min(iters, int(left // per_round)) if per_round > 0 else iters, 0)
    if n < iters:
        log(f"  {backbone} {roi}^3: {n} timed round(s) instead of {iters} (share {share_s:.0f} s, "
            f"{per_round:.1f} s per round-robin by the warm-ups, {max(left, 0):.0f} s left)")
    for i in range(n):
        for c in cases:
            dt = one_iteration(net, loss_fn, opt, c, x, y)
            c.times.append(dt)
            c.skipped += int(getattr(c, "_last_skipped", False))
            log(f"  {backbone} {roi}^3 {c.name}: iteration {i + 1}/{n} {dt:.2f} s")
    del net, opt, loss_fn, x, y
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"backbone": backbone, "roi": roi, "cases": cases, "modes": modes, "iters_asked": iters, "timed": n,
            "seconds": time.perf_counter() - t_start, "load": load_avg()}


def _per_iter(c: Case) -> float:
    return statistics.median(c.times) if c.times else c.warmup_s


def projection(small: Dict, roi: int) -> Dict:
    """Seconds per iteration at ``roi`` by voxel count from a measurement at a smaller crop."""
    f = (roi / small["roi"]) ** 3
    return {"backbone": small["backbone"], "roi": roi, "projected": {c.name: _per_iter(c) * f for c in small["cases"]},
            "from_roi": small["roi"], "seconds": 0.0}


def part1(args, device) -> List[Dict]:
    """Per backbone, an equal share of what is left of --budget-s. A backbone in --small-first is
    first measured at --fallback-roi, and at --roi only if the projection (voxel count) of a warm-up plus
    one timed iteration per precision fits what is left of its share; otherwise the projection is
    reported as such. Without it, --roi is measured directly and --fallback-roi only if no timed
    iteration fitted."""
    channels = [CLASS_INDEX[n] - 1 for n in LABEL_SETS[LABELS]]
    modes = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    results = []
    t_start = time.perf_counter()
    small_roi = args.fallback_roi if args.fallback_roi and args.fallback_roi < args.roi else 0
    for i, b in enumerate(args.backbones):
        left = args.budget_s - (time.perf_counter() - t_start)
        share = max(left, 0.0) / (len(args.backbones) - i)
        t_b = time.perf_counter()
        log(f"{b}: batch {BATCH}, {', '.join(modes)}; share of the budget {share:.0f} s; load {load_avg()}")

        def run(roi, s):
            try:
                return bench_backbone(b, roi, modes, args.iters, s, device, channels)
            except Exception as e:  # e.g. out of memory: report it, go on with the next backbone
                log(f"{b} {roi}^3: failed: {type(e).__name__}: {e}")
                gc.collect()
                return {"backbone": b, "roi": roi, "error": f"{type(e).__name__}: {str(e)[:200]}", "seconds": 0.0}

        if small_roi and b in args.small_first:
            small = run(small_roi, share)
            results.append(small)
            if "error" in small:
                continue
            proj = projection(small, args.roi)
            need = 2 * sum(proj["projected"].values())  # a warm-up and one timed iteration per precision
            left_b = share - (time.perf_counter() - t_b)
            if need <= left_b:
                results.append(run(args.roi, left_b))
            else:
                log(f"{b}: {args.roi}^3 projected at {need:.0f} s for a warm-up + 1 timed iteration per precision, "
                    f"{left_b:.0f} s left of the share: reported as a projection, not run")
                results.append(proj)
        else:
            r = run(args.roi, share)
            results.append(r)
            if "error" not in r and r["timed"] == 0 and small_roi:
                log(f"{b}: no timed iteration fitted at {args.roi}^3; measuring at {small_roi}^3")
                fb_share = max(args.budget_s - (time.perf_counter() - t_start), 0.0) / (len(args.backbones) - i)
                results.append(run(small_roi, max(fb_share, 1.0)))
    return results


def part1_table(results: List[Dict], device) -> str:
    cuda = device.type == "cuda"
    head = "| backbone | crop | precision | median s/iter | timed iters | min-max s | warm-up s | vs fp32 |"
    sep = "|---|---|---|---:|---:|---:|---:|---:|"
    if cuda:
        head += " peak GPU MiB | scaler-skipped steps |"
        sep += "---:|---:|"
    lines = [head, sep]
    notes = []
    for r in results:
        if "error" in r:
            lines.append(f"| {r['backbone']} | {r['roi']}^3 x{BATCH} | failed: {r['error']} |")
            continue
        if "projected" in r:
            p = r["projected"]
            for m, v in p.items():
                ratio = f"{p['fp32'] / v:.2f}x" if m != "fp32" and "fp32" in p else "-"
                lines.append(f"| {r['backbone']} | {r['roi']}^3 x{BATCH} | {m} | ~{v:.0f} (projected)\u2020 | 0 | - | - | {ratio} |"
                             + (" - | - |" if cuda else ""))
            notes.append(f"\u2020 {r['backbone']} {r['roi']}^3: not run (a warm-up + 1 timed iteration per precision "
                         f"did not fit the budget); projected from the {r['from_roi']}^3 measurement x "
                         f"({r['roi']}/{r['from_roi']})^3 voxels.")
            continue
        fp32 = next((c for c in r["cases"] if c.name == "fp32"), None)
        ref = _per_iter(fp32) if fp32 else None
        for c in r["cases"]:
            if c.times:
                med_s = f"{statistics.median(c.times):.2f}"
                rng = f"{min(c.times):.2f}-{max(c.times):.2f}"
            else:
                med_s = f"({c.warmup_s:.2f})*"
                rng = "-"
            med = _per_iter(c)
            ratio = f"{ref / med:.2f}x" if ref and c.name != "fp32" else "-"
            timed = f"{len(c.times)}" + (f" of {r['iters_asked']}" if len(c.times) < r["iters_asked"] else "")
            name = c.name + ("" if c.name == "fp32" else (" autocast+GradScaler" if c.scaler else " autocast"))
            row = f"| {r['backbone']} | {r['roi']}^3 x{BATCH} | {name} | {med_s} | {timed} | {rng} | {c.warmup_s:.2f} | {ratio} |"
            if cuda:
                row += f" {c.peak_mb:.0f} | {c.skipped} |"
            lines.append(row)
        missing = [m for m in r["modes"] if m not in {c.name for c in r["cases"]}]
        if missing:
            notes.append(f"{r['backbone']} {r['roi']}^3: {', '.join(missing)} left out (budget).")
        if r["timed"] == 0:
            notes.append(f"* {r['backbone']} {r['roi']}^3: no timed iteration fitted the budget; the value in "
                         "brackets is the single warm-up iteration (includes first-call overheads).")
        elif r["timed"] < r["iters_asked"]:
            notes.append(f"{r['backbone']} {r['roi']}^3: {r['timed']} timed iteration(s) per precision instead of "
                         f"{r['iters_asked']} (budget).")
    return "\n".join(lines + ([""] + notes if notes else []))


# --------------------------------------------------------------------------------------------
# Part 2: one round


class TimedScoring:
    """Wraps the importance scoring task to time the round's re-scoring."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = None

    def __call__(self, request, datastore):
        t = time.perf_counter()
        try:
            return self.inner(request, datastore)
        finally:
            self.seconds = time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self.inner, name)


def round_conf(preset: str, epochs: int) -> Dict[str, str]:
    """The round's conf on ``preset``; off the recipe the training crop is the preset's own window."""
    from lib.transforms.recipe import PRESETS

    conf = dict(ROUND_CONF, train_epochs=str(epochs))
    if preset != "recipe":
        conf.update(preset=preset, train_roi=",".join(str(r) for r in PRESETS[preset].roi))
    return conf


def timed_round(tasks, studies, reason: str) -> Tuple[str, float, Dict, Optional[float]]:
    """One round of ``tasks`` on the study folder ``studies`` (MONAI Label's local datastore), as the server
    runs it: (trigger state, wall seconds, the round log's entry, seconds of its re-scoring)."""
    from monailabel.datastore.local import LocalDatastore

    datastore = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    tasks.start_rounds(lambda: datastore)
    timed = TimedScoring(tasks.scoring["importance"])
    tasks.scoring["importance"] = timed  # the round looks the scoring task up when it runs
    start = time.perf_counter()
    # MONAI's training handlers log to stdout: send them to stderr so stdout stays the markdown report.
    with contextlib.redirect_stdout(sys.stderr):
        state = tasks.rounds.trigger(reason, wait=True)
    return state, time.perf_counter() - start, tasks.rounds.info().get("last") or {}, timed.seconds


def part2(args, device) -> Dict:
    import nibabel as nib

    from lib.app import build_tasks
    from testing.phantoms import make_phantom, write_phantom
    from lib.weights import RELEASED_FILES
    from testing.synthetic_weights import write_synthetic_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    studies = work / "studies"
    log(f"round: writing {ROUND_STUDIES} phantoms ({ROUND_LABELLED} with final labels) into {studies}")
    for i in range(ROUND_STUDIES):
        ph = make_phantom(100 + i, shape=ROUND_SHAPE, spacing_mm=ROUND_SPACING)
        write_phantom(ph, str(studies), f"ph_{i}", "labels/final" if i < ROUND_LABELLED else None)
    write_synthetic_checkpoint("segresnet", str(work / "weights" / RELEASED_FILES["segresnet"]))
    conf = dict(round_conf(args.round_preset, args.round_epochs), weights_dir=str(work / "weights"), model_dir=str(work / "model"), device=device.type)
    tasks = build_tasks(str(work / "app"), str(studies), conf)
    log(f"round: starting (load {load_avg()})")
    state, wall, last, scoring_s = timed_round(tasks, studies, "bench")
    log(f"round: {state}, {last.get('status')}, {wall:.1f} s")
    model_dir = work / "model"
    side = {}
    p = model_dir / "segresnet_finetuned.pth.json"
    if p.exists():
        side = json.loads(p.read_text())
    stats = {}
    p = model_dir / "train_segresnet_stats.json"
    if p.exists():
        stats = json.loads(p.read_text())
    split = {}
    p = studies / ".suprem" / "split.json"
    if p.exists():
        split = json.loads(p.read_text()).get("sides", {})
    img = nib.load(str(studies / "ph_0.nii.gz"))
    return {
        "state": state, "last": last, "wall": wall, "sidecar": side, "stats": stats, "split": split,
        "scoring_s": scoring_s, "image_shape": img.shape, "load": load_avg(), "work": str(work), "conf": conf,
    }


def part2_table(r: Dict, device) -> str:
    last, side = r["last"], r["sidecar"]
    total = last.get("seconds")
    train_s = side.get("seconds")
    score_s = r["scoring_s"]
    rest = total - (train_s or 0) - (score_s or 0) if total is not None else None
    n_train = sum(1 for s in r["split"].values() if s == "train")
    n_val = sum(1 for s in r["split"].values() if s == "val")
    conf = r["conf"]
    epochs = int(conf["train_epochs"])
    roi = "x".join(conf["train_roi"].split(",")) if "," in conf["train_roi"] else f"{conf['train_roi']}^3"
    ns = int(conf["train_num_samples"])
    amp = "fp32 (the train task uses no autocast on a CPU)" if device.type == "cpu" else "bf16 autocast (train_amp default)"

    def f(v):
        return "-" if v is None else f"{v:.1f}"

    lines = [
        "| part | seconds |",
        "|---|---:|",
        f"| whole round (round log `seconds`) | {f(total)} |",
        f"| train task: load + cache, {epochs} epochs, validation, publish (sidecar `seconds`) | {f(train_s)} |",
        f"| re-scoring of the unlabelled images (importance scoring task) | {f(score_s)} |",
        f"| rest (ranking, round log, bookkeeping) | {f(rest)} |",
        "",
        f"Round status: {last.get('status')} ({r['state']}), labels used {last.get('labels_used')}, "
        f"rescored {last.get('rescored')}, failed {last.get('rescore_failed')}"
        + (f", error: {last.get('error')}" if last.get("error") else "") + ".",
        f"Contents: {ROUND_STUDIES} phantom studies ({r['image_shape'][0]}x{r['image_shape'][1]}x{r['image_shape'][2]} voxels "
        f"at {ROUND_SPACING[0]}x{ROUND_SPACING[1]}x{ROUND_SPACING[2]} mm, ~96^3 at the recipe's 1.5 mm before the "
        f"foreground crop), {ROUND_LABELLED} with final labels: {n_train} train / {n_val} validation (kept split, "
        f"val_fraction {ROUND_CONF['val_fraction']}); segresnet from synthetic released weights; {epochs} epochs x "
        f"{n_train} images = {epochs * n_train} iterations of {ns} x {roi} crops, {amp}; validation every epoch "
        f"(sliding window {roi}, overlap 0.25); then {ROUND_STUDIES - ROUND_LABELLED} unlabelled images re-scored "
        "(96^3 windows, overlap 0) and ranked.",
        f"Validation mean Dice (synthetic weights, meaningless as accuracy): {last.get('mean_dice')}.",
    ]
    if r["stats"]:
        st = r["stats"]
        lines.append(f"Train task stats (MONAI Label's stats file): total_time {st.get('total_time')}, "
                     f"epochs {st.get('total_epochs')}, iterations per epoch {st.get('total_iterations')}, "
                     f"best metric {st.get('best_metric')}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--backbones", default="segresnet,unet,swinunetr", help="comma list of " + ",".join(BACKBONES))
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per precision (default 2 on CPU, 10 on CUDA)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for part 1 in all, shared equally by the backbones (default 900 on CPU, 600 on CUDA)")
    ap.add_argument("--roi", type=int, default=96, help="crop edge, voxels (default 96)")
    ap.add_argument("--fallback-roi", type=int, default=64, help="crop edge used when nothing fits at --roi (0: none)")
    ap.add_argument("--small-first", default=None,
                    help="comma list of backbones measured at --fallback-roi first, and at --roi only if the "
                    "projection fits (default on CPU: unet,swinunetr; on CUDA: none; 'none' for none)")
    ap.add_argument("--skip-round", action="store_true", help="skip part 2 (the whole round)")
    ap.add_argument("--round-preset", default="recipe", help="the round's preset (demo: a tiny round, for a smoke test)")
    ap.add_argument("--round-epochs", type=int, default=int(ROUND_CONF["train_epochs"]), help="the round's epochs")
    ap.add_argument("--keep-round-dir", action="store_true", help="keep the round's temporary folder")
    ap.add_argument("--skip-iters", action="store_true", help="skip part 1 (the iteration timings)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--verbose", action="store_true", help="INFO logging from the app and MONAI Label")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    bad = [b for b in args.backbones if b not in BACKBONES]
    if bad:
        ap.error(f"unknown backbone(s) {bad}; choose from {', '.join(BACKBONES)}")
    if args.iters is None:
        args.iters = 10 if device.type == "cuda" else 2
    if args.small_first is None:
        args.small_first = "unet,swinunetr" if device.type == "cpu" else ""
    args.small_first = [b.strip() for b in args.small_first.split(",") if b.strip() and b.strip() != "none"]
    if args.budget_s is None:
        args.budget_s = 600.0 if device.type == "cuda" else 900.0

    facts = bench_facts(device)
    print("## Machine\n")
    for k, v in facts.items():
        print(f"- {k}: {v}")
    print(f"- command: python -m bench.bench_train {' '.join(sys.argv[1:] if argv is None else argv)}")
    print()

    if not args.skip_iters:
        print(f"## Seconds per training iteration ({args.roi}^3 crops, batch {BATCH}, {OUT_CHANNELS} outputs, "
              f"loss on {len(LABEL_SETS[LABELS])} {LABELS} channels, AdamW)\n", flush=True)
        results = part1(args, device)
        print(part1_table(results, device))
        print(f"\nload average after part 1: {load_avg()}; part 1 took "
              f"{sum(r['seconds'] for r in results):.0f} s (budget {args.budget_s:.0f} s)\n", flush=True)

    if not args.skip_round:
        print("## One round (segresnet, in process)\n", flush=True)
        r = part2(args, device)
        print(part2_table(r, device))
        if args.keep_round_dir:
            print(f"\nload average after the round: {r['load']}; round folder kept: {r['work']}\n", flush=True)
        else:
            shutil.rmtree(r["work"], ignore_errors=True)
            print(f"\nload average after the round: {r['load']}\n", flush=True)
    print(f"total wall time {time.perf_counter() - T0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
