"""Rank a whole study folder offline: score every CT, write an AbdomenAtlas-style priority CSV.

    python -m lib.scoring.rank STUDIES --out ranking.csv [--models all] [--weights-dir DIR]

One JSON record per volume is written (atomically) beside the CSV as it finishes, so an interrupted
run loses at most the volume in progress and a re-run scores only what is missing or stale (other
model files, or a changed image file). The CSV lists volumes by descending score with their organs in
revision order.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import os
import sys
import tempfile
from typing import Dict, List, Optional

from lib.scoring.engine import ENGINES, InProcessEngine, file_stamp, is_current, make_engine

logger = logging.getLogger("lib.scoring.rank")

EXTENSIONS = (".nii.gz", ".nii", ".nrrd")


def study_files(folder: str) -> Dict[str, str]:
    """``{image id: path}`` of the CT files directly in ``folder`` (ids as MONAI Label names them)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        for ext in EXTENSIONS:
            if path.endswith(ext) and os.path.isfile(path):
                out[os.path.basename(path)[: -len(ext)]] = path
                break
    return out


def record_path(parts_dir: str, image_id: str) -> str:
    return os.path.join(parts_dir, f"{image_id}.json")


def load_record(parts_dir: str, image_id: str) -> Optional[Dict]:
    try:
        with open(record_path(parts_dir, image_id)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_csv(path: str, records: Dict[str, Dict]) -> None:
    """Priority list: scored volumes by descending score, then failures; written atomically."""
    rows = sorted(
        records.items(), key=lambda kv: ("score" not in kv[1], -float(kv[1].get("score", 0)), kv[0])
    )
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".rank-", suffix=".csv", dir=folder)
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "id", "score", "organs_by_priority", "attention_ml", "error"])
        for i, (image_id, rec) in enumerate(rows, 1):
            w.writerow(
                [
                    i if "score" in rec else "",
                    image_id,
                    rec.get("score", ""),
                    ";".join(rec.get("organs", [])),
                    ";".join(f"{k}={v}" for k, v in rec.get("attention_ml", {}).items()),
                    rec.get("error", ""),
                ]
            )
    os.replace(tmp, path)


def rank_folder(scorer, folder: str, out_csv: str, progress: bool = True, engine=None) -> Dict[str, Dict]:
    """Score every study of ``folder`` not already scored by the current models; write the CSV.

    ``engine``: where volumes are scored (``lib.scoring.engine``; default: in this process). The
    summary of the last run (workers, volumes lost by dead workers) is left in ``rank_folder.last``.
    """
    from lib.weights.registry import write_json_atomic

    engine = engine or InProcessEngine(scorer)
    parts = out_csv + ".parts"
    os.makedirs(parts, exist_ok=True)
    files = study_files(folder)
    versions = scorer.versions()
    records: Dict[str, Dict] = {}
    todo: List[str] = []
    for image_id, path in files.items():
        rec = load_record(parts, image_id)
        if rec is not None and is_current(rec, versions, file_stamp(path)):
            records[image_id] = rec
        else:
            todo.append(image_id)
    logger.info(f"{len(files)} studies, {len(records)} already scored, {len(todo)} to score ({engine.name})")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="volume", desc="scoring")

    def store(image_id: str, rec: Dict):
        write_json_atomic(record_path(parts, image_id), rec)
        records[image_id] = rec
        if "error" in rec:
            logger.error(f"{image_id}: {rec['error']}")
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{image_id} {rec.get('score', 'error')}")

    summary = engine.run([(i, files[i]) for i in todo], store)
    if bar is not None:
        bar.close()
    missing = summary.get("lost", []) + summary.get("not_started", [])
    if missing:
        logger.error(f"{len(missing)} volumes not scored (workers lost): {', '.join(missing[:20])}; run again to score them")
    rank_folder.last = summary
    write_csv(out_csv, records)
    return records


rank_folder.last = {}


def build_scorer(args):
    from lib.app import validate_checkpoint
    from lib.classes import label_set
    from lib.networks import BACKBONES
    from lib.scoring.volume import VolumeScorer
    from lib.transforms.recipe import PRESETS
    from lib.weights import WeightsRegistry

    models = list(BACKBONES) if args.models == "all" else args.models.split(",")
    registry = WeightsRegistry(
        args.model_dir, validate_checkpoint, weights_dir=args.weights_dir, use_pretrained_model=args.download
    )
    for b in models:
        registry.resolve(b)
    recipe = PRESETS[args.preset].with_overrides(overlap=args.overlap, sw_batch_size=args.sw_batch_size, amp=args.amp)
    scorer = VolumeScorer(
        models,
        registry,
        label_set(args.labels),
        recipe,
        device=args.device,
        entropy=args.entropy,
        cache_dir=args.cache_dir or None,
    )
    if not scorer.active():
        raise SystemExit(f"no weights for {', '.join(models)}: pass --weights-dir or --model-dir")
    return scorer


def parser() -> argparse.ArgumentParser:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = argparse.ArgumentParser(prog="python -m lib.scoring.rank", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("studies", help="folder of CT files (NIfTI or NRRD)")
    p.add_argument("--out", default="ranking.csv", help="CSV to write (per-volume records go to OUT.parts/)")
    p.add_argument("--models", default="all", help="all, or a comma list of unet,swinunetr,segresnet")
    p.add_argument("--labels", default="atlas25", choices=("atlas25", "atlas9", "all32"))
    p.add_argument("--weights-dir", default=None, help="folder holding the released .pth files")
    p.add_argument("--model-dir", default=os.path.join(root, "apps", "suprem", "model"))
    p.add_argument("--download", action="store_true", help="download missing released weights")
    p.add_argument("--preset", default="recipe", choices=("recipe", "fast"))
    p.add_argument("--overlap", type=float, default=None)
    p.add_argument("--sw-batch-size", type=int, default=None)
    p.add_argument("--amp", default=None, choices=("none", "fp16", "bf16"))
    p.add_argument("--entropy", default="positive", choices=("positive", "binary"))
    p.add_argument("--device", default=None)
    p.add_argument("--cache-dir", default=None,
                   help="keep pre-processed volumes here for the next run (keyed by recipe and file)")
    p.add_argument("--engine", default="inprocess", choices=ENGINES,
                   help="inprocess, or ray: one Ray worker per GPU (or CPU core), local unless --ray-address")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (auto, ray://host:10001)")
    p.add_argument("--workers", type=int, default=0, help="Ray workers (default: GPUs, else CPU cores)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 when Ray has GPUs, else 0")
    p.add_argument("--retries", type=int, default=1, help="Ray: restarts of a dead worker and retries of its volume")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    scorer = build_scorer(args)
    engine = make_engine(
        scorer,
        args.engine,
        **(
            dict(address=args.ray_address, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                 retries=args.retries)
            if args.engine == "ray"
            else {}
        ),
    )
    records = rank_folder(scorer, args.studies, args.out, progress=not args.no_progress, engine=engine)
    n_ok = sum(1 for r in records.values() if "score" in r)
    missing = rank_folder.last.get("lost", []) + rank_folder.last.get("not_started", [])
    print(f"{n_ok} of {len(study_files(args.studies))} volumes scored; priority list: {args.out}")
    if missing:
        print(f"{len(missing)} volumes were lost with their workers; run the same command again to score them")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
