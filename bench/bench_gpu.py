"""Benchmark: one clinical-size CT on one GPU, scoring step and ensemble infer request, stage by stage.

    python -m bench.bench_gpu                     # on a GPU machine: about 2-3 minutes, no network
    python -m bench.bench_gpu --smoke             # tiny input, any device: checks the script end to end

Input: the shared real CT (../shared/data/totalseg-example/ct.nii.gz, 122x101x30 at 3 mm, 90 mm along
its axis) extended along its axis by mirroring (the slices, then the same slices reversed, ...) to 336
mm, and resampled (trilinear) to a clinical thin-slice grid of 0.8 x 0.8 x 1.25 mm: 458x379x269 int16, a
.nii.gz file; its working grid at 1.5 mm is about 245x194x224, like a whole abdominal CT. Weights:
synthetic checkpoints in the released format (testing/synthetic_weights.py; speed does not depend on
the values). The preprocessing cache is off, so every run reads and resamples the file.

For each preset (recipe, fast) the script builds the app's tasks as the server does (``lib.app.build_tasks``,
three backbones, atlas25 labels), warms each network up on a small input, then times:

  scoring   ``VolumeScorer.score_file`` (the step of the server's scoring method, the offline ranking and
            each Ray worker): its record's stages (pre, each backbone, masks, attention) and total;
  infer     the ``ensemble`` infer task called as the server calls it, request in to label map written:
            its result's stages (pre, each backbone, label map, resample, write) and latency total;
  per volume (fast preset only) the in-process engine on --volumes copies of the file, with the next
            volume loaded while the current one is scored: wall time / volumes, the steady-state time
            per volume from which a 9,262-CT round on 8 GPUs is projected.

It prints the stage table and MET / NOT MET against the targets of issue 13 (one H100/H200: scoring
< 5 s, ensemble infer < 5 s, round < 1.5 h on 8 GPUs) and writes the table as markdown (--out) for
bench/RESULTS.md. ``--smoke``: a 64^3-voxel working grid, 64^3 windows, 2 volumes; the verdicts are
then printed but are not a measurement.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from bench.machine import machine_facts

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SHARED_CT = ROOT.parent / "shared" / "data" / "totalseg-example" / "ct.nii.gz"
BACKBONES = ("unet", "swinunetr", "segresnet")
ROUND_VOLUMES, ROUND_GPUS = 9262, 8
TARGET_SCORE_S, TARGET_INFER_S, TARGET_ROUND_H = 5.0, 5.0, 1.5
# What an input is made of: axis extent (mm), voxel size (mm), in-plane field of view (mm, None = all).
FULL = {"z_mm": 336.0, "spacing": (0.8, 0.8, 1.25), "xy_mm": None}
SMOKE = {"z_mm": 96.0, "spacing": (3.0, 3.0, 3.0), "xy_mm": 96.0}

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def mirrored_ct(src: str, out: str, z_mm: float, spacing, xy_mm: Optional[float]) -> Tuple[tuple, tuple]:
    """Write ``out``: the CT ``src`` extended to ``z_mm`` along its third axis by mirroring, cropped in-plane
    to ``xy_mm`` around its centre, resampled (trilinear) to ``spacing``. Returns (shape, spacing)."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(src))
    vol = np.asarray(img.dataobj, dtype=np.float32)
    zooms = np.array(img.header.get_zooms()[:3], dtype=float)
    n_z = int(round(z_mm / zooms[2]))
    reps = [vol if i % 2 == 0 else vol[:, :, ::-1] for i in range(-(-n_z // vol.shape[2]))]
    vol = np.concatenate(reps, axis=2)[:, :, :n_z]
    if xy_mm:
        keep = [min(s, int(round(xy_mm / z))) for s, z in zip(vol.shape[:2], zooms[:2])]
        lo = [(s - k) // 2 for s, k in zip(vol.shape[:2], keep)]
        vol = vol[lo[0] : lo[0] + keep[0], lo[1] : lo[1] + keep[1]]
    else:
        lo = [0, 0]
    size = [max(1, int(round(n * z / s))) for n, z, s in zip(vol.shape, zooms, spacing)]
    t = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(vol))[None, None], size=size,
                                        mode="trilinear", align_corners=True)[0, 0]
    affine = img.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([lo[0], lo[1], 0.0])
    affine[:3, :3] = np.diag(spacing)  # canonical (RAS) axes
    nii = nib.Nifti1Image(torch.round(t).numpy().astype(np.int16), affine)
    nii.header.set_zooms(spacing)
    nib.save(nii, out)
    return tuple(size), tuple(spacing)


def build(work: Path, preset: str, device: str, tf32: Optional[str], roi: Optional[int]):
    """The app's tasks for ``preset`` on synthetic weights, as the server builds them."""
    from lib.app import build_tasks
    from lib.weights import RELEASED_FILES
    from testing.synthetic_weights import write_synthetic_checkpoint

    weights = work / "weights"
    for b in BACKBONES:
        if not (weights / RELEASED_FILES[b]).exists():
            write_synthetic_checkpoint(b, str(weights / RELEASED_FILES[b]))
    conf = {"models": ",".join(BACKBONES), "weights_dir": str(weights), "use_pretrained_model": "false",
            "preset": preset, "device": device, "preprocess_cache": "false", "skip_trainers": "true",
            "skip_strategies": "true", "model_dir": str(work / f"model-{preset}")}
    if tf32:
        conf["tf32"] = tf32
    tasks = build_tasks(str(work / "app"), str(work / "studies"), conf)
    scorer = tasks.infers["attention"].scorer
    if roi:  # smoke: windows the size of its small grid
        recipe = scorer.recipe.with_overrides(roi=(roi,) * 3)
        scorer.recipe = recipe
        tasks.infers["ensemble"].recipe = recipe
    return scorer, tasks.infers["ensemble"]


def infer(task, path: str, device: str) -> Dict:
    label_file, result = task({"image": path, "device": device})
    if label_file and os.path.exists(label_file):
        os.remove(label_file)
    return result


def per_volume_seconds(scorer, path: str, work: Path, n: int) -> float:
    """Wall time per volume of the in-process engine (next volume loaded meanwhile) on ``n`` copies."""
    from lib.importance.engines import InProcessEngine

    copies = work / "copies"
    copies.mkdir(exist_ok=True)
    jobs = []
    for i in range(n):
        dst = copies / f"ct{i}.nii.gz"
        if not dst.exists():
            shutil.copyfile(path, dst)
        jobs.append((f"ct{i}", str(dst)))
    errors = []
    start = time.perf_counter()
    InProcessEngine(scorer).run(jobs, lambda i, rec: errors.append(rec["error"]) if "error" in rec else None)
    if errors:
        raise SystemExit(f"scoring failed: {errors[0]}")
    return (time.perf_counter() - start) / n


def run_preset(args, work: Path, preset: str, path: str, warm_path: str) -> Dict:
    log(f"{preset}: building the tasks, warming up (model loading, first kernels)")
    scorer, ensemble = build(work, preset, args.device, args.tf32, 64 if args.smoke else None)
    scorer.score_file(warm_path)
    infer(ensemble, warm_path, args.device)
    log(f"{preset}: scoring")
    record, _ = scorer.score_file(path)
    if "error" in record:
        raise SystemExit(f"scoring failed: {record['error']}")
    log(f"{preset}: scoring {record['seconds']:.2f} s {record['stages']}; ensemble infer")
    result = infer(ensemble, path, args.device)
    log(f"{preset}: infer {result['latencies']['total']:.2f} s {result['stages']}")
    out = {"scoring": (record["stages"], record["seconds"]), "infer": (result["stages"], result["latencies"]["total"])}
    if preset == "fast":
        out["per_volume"] = per_volume_seconds(scorer, path, work, args.volumes)
        log(f"{preset}: {out['per_volume']:.2f} s per volume over {args.volumes} volumes")
    out["recipe"] = scorer.recipe.as_dict()
    return out


COLUMNS = ("pre",) + BACKBONES + ("masks", "attention", "label_map", "resample", "write")


def render(args, facts: Dict, inp: Dict, results: Dict[str, Dict]) -> Tuple[str, List[str]]:
    """The markdown report and the verdict lines."""
    from lib.transforms.labels import largest_component_backend

    L = [f"### bench_gpu.py{' --smoke' if args.smoke else ''} ({facts['date']})", ""]
    L += [f"- {k}: {v}" for k, v in facts.items() if k != "date"]
    L += [f"- input: {inp['what']}", f"- largest component: {largest_component_backend(args.device)}",
          f"- tf32: {args.tf32 or 'torch default'}", ""]
    L.append("| preset | step | " + " | ".join(COLUMNS) + " | total s |")
    L.append("|---|---|" + "---|" * (len(COLUMNS) + 1))
    for preset, res in results.items():
        for step in ("scoring", "infer"):
            stages, total = res[step]
            cells = [f"{stages[c]:.2f}" if c in stages else "" for c in COLUMNS]
            L.append(f"| {preset} | {step} | " + " | ".join(cells) + f" | **{total:.2f}** |")
    verdicts = []
    fast = results.get("fast")
    if fast:
        per = fast["per_volume"]
        round_h = ROUND_VOLUMES * per / ROUND_GPUS / 3600
        checks = [
            (f"scoring, fast preset: {fast['scoring'][1]:.2f} s", fast["scoring"][1] < TARGET_SCORE_S, f"< {TARGET_SCORE_S:.0f} s"),
            (f"ensemble infer, fast preset: {fast['infer'][1]:.2f} s", fast["infer"][1] < TARGET_INFER_S, f"< {TARGET_INFER_S:.0f} s"),
            (f"{ROUND_VOLUMES:,}-CT round on {ROUND_GPUS} GPUs: {round_h:.2f} h (from {per:.2f} s per volume with "
             f"the next loaded meanwhile)", round_h < TARGET_ROUND_H, f"< {TARGET_ROUND_H} h"),
        ]
        note = " (smoke run: not a measurement)" if args.smoke else ""
        verdicts = [f"{'MET' if ok else 'NOT MET'}: {what} (target {target}){note}" for what, ok, target in checks]
    L += [""] + [f"- {v}" for v in verdicts]
    return "\n".join(L) + "\n", verdicts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", default="recipe,fast", help="comma list of recipe, fast")
    ap.add_argument("--tf32", default=None, choices=("true", "false"), help="default: torch's default")
    ap.add_argument("--volumes", type=int, default=None, help="copies scored for the per-volume time (default 3; smoke 2)")
    ap.add_argument("--smoke", action="store_true", help="tiny input: checks the script runs, measures nothing")
    ap.add_argument("--work", default=None, help="folder for the input and weights (default: a temporary one)")
    ap.add_argument("--out", default="bench_gpu.md", help="markdown table written here, for bench/RESULTS.md")
    args = ap.parse_args(argv)
    args.volumes = args.volumes or (2 if args.smoke else 3)
    warnings.filterwarnings("ignore")
    if not SHARED_CT.exists():
        raise SystemExit(f"shared CT not found: {SHARED_CT}")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        shape = FULL if not args.smoke else SMOKE
        path, warm = str(work / "ct.nii.gz"), str(work / "warm.nii.gz")
        size, spacing = mirrored_ct(str(SHARED_CT), path, shape["z_mm"], shape["spacing"], shape["xy_mm"])
        mirrored_ct(str(SHARED_CT), warm, **SMOKE)
        inp = {"what": f"shared CT mirrored to {shape['z_mm']:.0f} mm, {'x'.join(map(str, size))} at "
                       f"{'x'.join(map(str, spacing))} mm ({os.path.getsize(path) / 1e6:.0f} MB .nii.gz)"}
        log(f"input: {inp['what']}")
        presets = [p.strip() for p in args.presets.split(",") if p.strip()]
        results = {p: run_preset(args, work, p, path, warm) for p in presets}
        report, verdicts = render(args, machine_facts(torch.device(args.device)), inp, results)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(report)
    with open(args.out, "w") as f:
        f.write(report)
    log(f"table written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
