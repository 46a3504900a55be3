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

  variants  (fast preset, ``--variants``) ``--conf compile true`` and ``--conf channels_last true``, each
            warmed up on the input itself (torch.compile compiles for the shapes it sees) and timed as
            above, and its ensemble label map compared voxel for voxel with the default's;
  round     (``--round``) a whole active-learning round as the server runs it (``tasks.rounds``): every
            backbone fine-tuned (bf16, 96^3 crops, ``--round-epochs`` epochs) on labelled copies of the
            input (its TotalSegmentator labels, mirrored likewise), published, then the unlabelled copies
            re-scored and ranked; projected to 400 revised volumes and a 9,262-CT pool on 8 GPUs.

With ``--weights DIR`` (the released .pth files) the networks are the real ones and the two presets'
ensemble label maps are compared organ by organ (Dice of fast against recipe): what ``fast`` costs.

Pre-processing runs on the device (the grid steps as tensor ops on the GPU), as the server does there.
It prints the stage table and MET / NOT MET against the targets of issue 23 (one H100/H200: scoring
< 2 s, ensemble infer < 2 s, < 1.2 s per volume with the next loaded meanwhile) and issue 13 (round < 1.5 h
on 8 GPUs) and writes the table as markdown (--out) for bench/RESULTS.md. ``--smoke``: a 64^3-voxel
working grid, 32^3 windows, segresnet only, 2 volumes, a one-epoch round; the verdicts are then printed
but are not a measurement.
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
SHARED_SEG = SHARED_CT.parent / "seg.nii.gz"  # TotalSegmentator labels of the CT (--conf train_label_map totalseg)
BACKBONES = ("unet", "swinunetr", "segresnet")
ROUND_VOLUMES, ROUND_GPUS, ROUND_REVISED = 9262, 8, 400
TARGET_SCORE_S, TARGET_INFER_S, TARGET_PER_VOLUME_S, TARGET_ROUND_H = 2.0, 2.0, 1.2, 1.5
VARIANTS = {"default": {}, "compile": {"compile": "true"}, "channels_last": {"channels_last": "true"}}
# What an input is made of: axis extent (mm), voxel size (mm), in-plane field of view (mm, None = all).
FULL = {"z_mm": 336.0, "spacing": (0.8, 0.8, 1.25), "xy_mm": None}
SMOKE = {"z_mm": 96.0, "spacing": (3.0, 3.0, 3.0), "xy_mm": 96.0}
SMOKE_ROI = 32  # the smoke run's sliding window and training crop

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def mirrored_ct(src: str, out: str, z_mm: float, spacing, xy_mm: Optional[float], labels: bool = False) -> Tuple[tuple, tuple]:
    """Write ``out``: the CT ``src`` extended to ``z_mm`` along its third axis by mirroring, cropped in-plane
    to ``xy_mm`` around its centre, resampled (trilinear; nearest for a label map, ``labels``) to ``spacing``.
    Returns (shape, spacing)."""
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
                                        mode="nearest" if labels else "trilinear",
                                        align_corners=None if labels else True)[0, 0]
    affine = img.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([lo[0], lo[1], 0.0])
    affine[:3, :3] = np.diag(spacing)  # canonical (RAS) axes
    nii = nib.Nifti1Image(torch.round(t).numpy().astype(np.uint8 if labels else np.int16), affine)
    nii.header.set_zooms(spacing)
    nib.save(nii, out)
    return tuple(size), tuple(spacing)


def write_weights(work: Path, backbones, weights_dir: Optional[str]) -> str:
    """The folder of released-format weights: ``weights_dir`` (real ones) or synthetic checkpoints."""
    from lib.weights import RELEASED_FILES
    from testing.synthetic_weights import write_synthetic_checkpoint

    if weights_dir:
        return weights_dir
    weights = work / "weights"
    for b in backbones:
        if not (weights / RELEASED_FILES[b]).exists():
            write_synthetic_checkpoint(b, str(weights / RELEASED_FILES[b]))
    return str(weights)


def app_conf(args, work: Path, preset: str, name: str, **extra) -> Dict[str, str]:
    """The server's --conf for a run of this benchmark (its own model folder per ``name``)."""
    conf = {"models": ",".join(args.models), "weights_dir": write_weights(work, args.models, args.weights),
            "use_pretrained_model": "false", "preset": preset, "device": args.device, "model_dir": str(work / f"model-{name}")}
    if args.tf32:
        conf["tf32"] = args.tf32
    return {**conf, **extra}


def build(args, work: Path, preset: str, name: str, **extra):
    """The app's scorer and ensemble infer task for ``preset`` (and conf ``extra``), as the server builds them."""
    from lib.app import build_tasks

    if args.smoke:  # a few windows the size of its small grid, on any CPU
        extra = {"overlap": "0", "sw_batch_size": "8", "amp": "none", **extra}
    conf = app_conf(args, work, preset, name, preprocess_cache="false", skip_trainers="true", skip_strategies="true",
                    **extra)
    tasks = build_tasks(str(work / "app"), str(work / "studies"), conf)
    scorer = tasks.infers["attention"].scorer
    if args.smoke:
        recipe = scorer.recipe.with_overrides(roi=(SMOKE_ROI,) * 3)
        scorer.recipe = recipe
        tasks.infers["ensemble"].recipe = recipe
    return scorer, tasks.infers["ensemble"]


def infer(task, path: str, device: str) -> Tuple[Dict, np.ndarray]:
    """The ensemble infer request as the server calls it: its result and the label map it wrote."""
    import nibabel as nib

    label_file, result = task({"image": path, "device": device})
    label = np.asarray(nib.load(label_file).dataobj)
    os.remove(label_file)
    return result, label


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


def run_preset(args, work: Path, preset: str, path: str, warm_path: str, variant: str = "default") -> Dict:
    """Scoring and ensemble infer of ``path``, after a warm-up on ``warm_path`` (the input itself for a
    compiled variant, which compiles for the shapes it is given)."""
    name = preset if variant == "default" else f"{preset}-{variant}"
    log(f"{name}: building the tasks, warming up (model loading, first kernels)")
    scorer, ensemble = build(args, work, preset, name, **VARIANTS[variant])
    scorer.score_file(warm_path)
    infer(ensemble, warm_path, args.device)
    log(f"{name}: scoring")
    record, _ = scorer.score_file(path)
    if "error" in record:
        raise SystemExit(f"scoring failed: {record['error']}")
    log(f"{name}: scoring {record['seconds']:.2f} s {record['stages']}; ensemble infer")
    result, label = infer(ensemble, path, args.device)
    log(f"{name}: infer {result['latencies']['total']:.2f} s {result['stages']}")
    out = {"scoring": (record["stages"], record["seconds"]), "infer": (result["stages"], result["latencies"]["total"]),
           "label": label, "labels": list(ensemble.label_names)}
    if preset == "fast" and variant == "default":
        out["per_volume"] = per_volume_seconds(scorer, path, work, args.volumes)
        log(f"{name}: {out['per_volume']:.2f} s per volume over {args.volumes} volumes")
    out["recipe"] = scorer.recipe.as_dict()
    return out


def organ_dice(a: np.ndarray, b: np.ndarray, labels: List[str]) -> Dict[str, Optional[float]]:
    """Dice per organ of two label maps valued by SuPreM class index (None where neither has the organ)."""
    from lib.classes import CLASS_INDEX

    out = {}
    for name in labels:
        x, y = a == CLASS_INDEX[name], b == CLASS_INDEX[name]
        total = int(x.sum()) + int(y.sum())
        out[name] = None if total == 0 else round(2.0 * int((x & y).sum()) / total, 4)
    return out


def agreement(a: np.ndarray, b: np.ndarray, labels: List[str]) -> Dict:
    """How far two label maps agree: share of identical voxels, and the lowest and mean organ Dice."""
    dice = {o: d for o, d in organ_dice(a, b, labels).items() if d is not None}
    return {"same_voxels": float((a == b).mean()), "dice": dice,
            "min_dice": min(dice.values()) if dice else None,
            "mean_dice": round(float(np.mean(list(dice.values()))), 4) if dice else None}


# --------------------------------------------------------------------------------------------
# A whole round on the device


def round_studies(args, work: Path, shape: Dict) -> Path:
    """A study folder: ``--round-labelled`` copies of the input with final labels, ``--round-unlabelled``
    without (the labels are the shared CT's TotalSegmentator labels, mirrored as the CT is)."""
    from lib.files import write_json_atomic

    studies = work / "round" / "studies"
    final = studies / "labels" / "final"
    final.mkdir(parents=True, exist_ok=True)
    first = studies / "ct_l0.nii.gz"
    mirrored_ct(str(SHARED_CT), str(first), shape["z_mm"], shape["spacing"], shape["xy_mm"])
    mirrored_ct(str(SHARED_SEG), str(final / first.name), shape["z_mm"], shape["spacing"], shape["xy_mm"], labels=True)
    for i in range(1, args.round_labelled):
        shutil.copyfile(first, studies / f"ct_l{i}.nii.gz")
        shutil.copyfile(final / first.name, final / f"ct_l{i}.nii.gz")
    for i in range(args.round_unlabelled):
        shutil.copyfile(first, studies / f"ct_u{i}.nii.gz")
    # The train task's kept split, written ahead: one labelled copy in five validates (val_fraction 0.2), as
    # the projection assumes (the hash split of so few names could put none there).
    n_val = max(1, round(0.2 * args.round_labelled)) if args.round_labelled > 1 else 0
    (studies / ".suprem").mkdir(exist_ok=True)
    sides = {f"ct_l{i}.nii.gz": "val" if i >= args.round_labelled - n_val else "train" for i in range(args.round_labelled)}
    write_json_atomic(str(studies / ".suprem" / "split.json"), {"val_fraction": 0.2, "seed": 0, "sides": sides})
    return studies


def run_round(args, work: Path, shape: Dict) -> Dict:
    """One round as the server runs it, timed part by part (train per backbone, re-scoring, the rest)."""
    import json

    from bench.bench_train import timed_round
    from lib.app import build_tasks

    studies = round_studies(args, work, shape)
    conf = app_conf(args, work, "fast", "round", train_label_map="totalseg", train_epochs=str(args.round_epochs),
                    val_fraction="0.2", train_amp="bf16", skip_strategies="true",
                    **({"train_roi": str(SMOKE_ROI)} if args.smoke else {}))
    tasks = build_tasks(str(work / "round" / "app"), str(studies), conf)
    log(f"round: {args.round_labelled} labelled + {args.round_unlabelled} unlabelled copies, {args.round_epochs} epochs")
    state, wall, last, rescore_s = timed_round(tasks, studies, "bench_gpu")
    split = json.loads((studies / ".suprem" / "split.json").read_text()).get("sides", {})
    train_s = {}
    for b in args.models:
        side = Path(tasks.registry.published_path(b) + ".json")
        train_s[b] = json.loads(side.read_text()).get("seconds") if side.exists() else None
    log(f"round: {state}, {last.get('status')}, {wall:.1f} s, train {train_s}, re-scoring {rescore_s}")
    return {"status": last.get("status"), "error": last.get("error"), "wall": wall, "train_s": train_s,
            "rescore_s": rescore_s, "rescored": last.get("rescored"), "epochs": args.round_epochs,
            "n_train": sum(1 for v in split.values() if v == "train"),
            "n_val": sum(1 for v in split.values() if v == "val"), "unlabelled": args.round_unlabelled}


def round_projection(r: Dict, per_volume_s: float) -> Dict:
    """A round for ROUND_REVISED revised volumes and a ROUND_VOLUMES pool on ROUND_GPUS GPUs, from the
    measured round: each backbone's training time per (training image x epoch), all in (data, validation
    on the same share of images, publishing), at the train task's default 50 epochs and val_fraction 0.2,
    spread over the GPUs (MONAI Label's multi-GPU training; perfect scaling assumed); re-scoring from the
    steady-state time per volume, spread over the GPUs."""
    per_image_epoch = {b: s / (r["epochs"] * max(1, r["n_train"])) for b, s in r["train_s"].items() if s}
    train_h = sum(per_image_epoch.values()) * 50 * ROUND_REVISED * 0.8 / ROUND_GPUS / 3600
    score_h = per_volume_s * ROUND_VOLUMES / ROUND_GPUS / 3600
    return {"per_image_epoch": per_image_epoch, "train_h": train_h, "score_h": score_h, "total_h": train_h + score_h}


# --------------------------------------------------------------------------------------------
# Report


COLUMNS = ("pre",) + BACKBONES + ("masks", "attention", "label_map", "resample", "write")


def stage_table(results: Dict[str, Dict]) -> List[str]:
    L = ["| run | step | " + " | ".join(COLUMNS) + " | total s |", "|---|---|" + "---|" * (len(COLUMNS) + 1)]
    for name, res in results.items():
        for step in ("scoring", "infer"):
            stages, total = res[step]
            cells = [f"{stages[c]:.2f}" if c in stages else "" for c in COLUMNS]
            L.append(f"| {name} | {step} | " + " | ".join(cells) + f" | **{total:.2f}** |")
    return L


def agreement_lines(args, results: Dict[str, Dict]) -> List[str]:
    """Each variant's label map against the default's; with real weights, fast against recipe per organ."""
    L = []
    fast = results.get("fast")
    for name, res in results.items():
        if fast is not None and name.startswith("fast-"):
            a = agreement(fast["label"], res["label"], fast["labels"])
            L.append(f"- {name} against fast: {a['same_voxels']:.6f} of the voxels identical, organ Dice min "
                     f"{a['min_dice']}, mean {a['mean_dice']}")
    if fast is not None and "recipe" in results:
        a = agreement(results["recipe"]["label"], fast["label"], fast["labels"])
        what = "released weights" if args.weights else "synthetic weights: says nothing of accuracy"
        L.append(f"- fast against recipe ({what}): {a['same_voxels']:.4f} of the voxels identical, organ Dice "
                 f"min {a['min_dice']}, mean {a['mean_dice']}")
        if args.weights:
            L.append("  - per organ: " + ", ".join(f"{o} {d:.3f}" for o, d in a["dice"].items()))
    return L


def round_lines(r: Dict, proj: Optional[Dict]) -> List[str]:
    L = [f"- round ({r['status']}{', ' + str(r['error']) if r.get('error') else ''}): {r['wall']:.1f} s in all; "
         f"{r['n_train']} training + {r['n_val']} validation copies x {r['epochs']} epochs per backbone, bf16, "
         f"train seconds {r['train_s']}; re-scoring {r['unlabelled']} unlabelled copies "
         f"{(r['rescore_s'] or 0):.1f} s"]
    if proj:
        per = ", ".join(f"{b} {s:.2f}" for b, s in proj["per_image_epoch"].items())
        L.append(f"- training seconds per (image x epoch), all in: {per}")
        L.append(f"- projected round for {ROUND_REVISED} revised volumes (50 epochs, val_fraction 0.2) and a "
                 f"{ROUND_VOLUMES:,}-CT pool on {ROUND_GPUS} GPUs: {proj['total_h']:.2f} h (training "
                 f"{proj['train_h']:.2f} h, re-scoring {proj['score_h']:.2f} h)")
    return L


def verdicts(args, results: Dict[str, Dict]) -> List[str]:
    fast = results.get("fast")
    if not fast:
        return []
    per = fast["per_volume"]
    round_h = ROUND_VOLUMES * per / ROUND_GPUS / 3600
    checks = [
        (f"scoring, fast preset: {fast['scoring'][1]:.2f} s", fast["scoring"][1] < TARGET_SCORE_S, f"< {TARGET_SCORE_S} s"),
        (f"ensemble infer, fast preset: {fast['infer'][1]:.2f} s", fast["infer"][1] < TARGET_INFER_S, f"< {TARGET_INFER_S} s"),
        (f"{per:.2f} s per volume with the next loaded meanwhile", per < TARGET_PER_VOLUME_S, f"< {TARGET_PER_VOLUME_S} s"),
        (f"{ROUND_VOLUMES:,}-CT scoring pass on {ROUND_GPUS} GPUs: {round_h:.2f} h", round_h < TARGET_ROUND_H,
         f"< {TARGET_ROUND_H} h"),
    ]
    note = " (smoke run: not a measurement)" if args.smoke else ""
    return [f"{'MET' if ok else 'NOT MET'}: {what} (target {target}){note}" for what, ok, target in checks]


def render(args, facts: Dict, inp: Dict, results: Dict[str, Dict], rnd: Optional[Dict]) -> Tuple[str, List[str]]:
    """The markdown report and the verdict lines."""
    from lib.transforms.labels import largest_component_backend

    L = [f"### bench_gpu.py{' --smoke' if args.smoke else ''} ({facts['date']})", ""]
    L += [f"- {k}: {v}" for k, v in facts.items() if k != "date"]
    L += [f"- input: {inp['what']}", f"- largest component: {largest_component_backend(args.device)}",
          f"- tf32: {args.tf32 or 'torch default'}; weights: {args.weights or 'synthetic'}; models: {','.join(args.models)}", ""]
    L += stage_table(results) + [""] + agreement_lines(args, results)
    if rnd:
        fast = results.get("fast")
        L += round_lines(rnd, round_projection(rnd, fast["per_volume"]) if fast else None)
    found = verdicts(args, results)
    L += [""] + [f"- {v}" for v in found]
    return "\n".join(L) + "\n", found


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", default="fast,recipe", help="comma list of fast, recipe")
    ap.add_argument("--variants", default="", help="comma list of compile, channels_last (fast preset)")
    ap.add_argument("--models", default=",".join(BACKBONES), help="comma list of backbones (default: all three)")
    ap.add_argument("--weights", default=None, help="folder with the released .pth files (default: synthetic)")
    ap.add_argument("--tf32", default=None, choices=("true", "false"), help="default: torch's default")
    ap.add_argument("--volumes", type=int, default=None, help="copies scored for the per-volume time (default 3; smoke 2)")
    ap.add_argument("--round", action="store_true", help="also time a whole round (train, publish, re-score)")
    ap.add_argument("--round-epochs", type=int, default=None, help="epochs a backbone trains in the round (default 4; smoke 1)")
    ap.add_argument("--round-labelled", type=int, default=5, help="labelled copies in the round (0.2 of them validate)")
    ap.add_argument("--round-unlabelled", type=int, default=4, help="unlabelled copies re-scored by the round")
    ap.add_argument("--smoke", action="store_true", help="tiny input: checks the script runs, measures nothing")
    ap.add_argument("--work", default=None, help="folder for the input and weights (default: a temporary one)")
    ap.add_argument("--out", default="bench_gpu.md", help="markdown table written here, for bench/RESULTS.md")
    args = ap.parse_args(argv)
    args.volumes = args.volumes or (2 if args.smoke else 3)
    args.round_epochs = args.round_epochs or (1 if args.smoke else 4)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.smoke and args.models == list(BACKBONES):
        args.models = ["segresnet"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
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
        results = {}
        for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
            results[preset] = run_preset(args, work, preset, path, warm)
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            results[f"fast-{variant}"] = run_preset(args, work, "fast", path, path, variant)
        rnd = run_round(args, work, shape) if args.round else None
        report, found = render(args, machine_facts(torch.device(args.device)), inp, results, rnd)
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
