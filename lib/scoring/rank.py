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

from lib.scoring.importance import file_stamp, is_current

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


def rank_folder(scorer, folder: str, out_csv: str, progress: bool = True) -> Dict[str, Dict]:
    """Score every study of ``folder`` not already scored by the current models; write the CSV."""
    from lib.errors import describe_error
    from lib.weights.registry import write_json_atomic

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
    logger.info(f"{len(files)} studies, {len(records)} already scored, {len(todo)} to score")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="volume", desc="scoring")
    for image_id in todo:
        path = files[image_id]
        try:
            rec, _ = scorer.score_file(path)
        except Exception as e:  # one bad study must not stop the run
            rec = {"error": describe_error(e)[:500], "models": versions}
            logger.error(f"{image_id}: {rec['error']}")
        rec["file"] = file_stamp(path)
        write_json_atomic(record_path(parts, image_id), rec)
        records[image_id] = rec
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{image_id} {rec.get('score', 'error')}")
    if bar is not None:
        bar.close()
    write_csv(out_csv, records)
    return records


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
        models, registry, label_set(args.labels), recipe, device=args.device, entropy=args.entropy
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
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    scorer = build_scorer(args)
    records = rank_folder(scorer, args.studies, args.out, progress=not args.no_progress)
    n_ok = sum(1 for r in records.values() if "score" in r)
    print(f"{n_ok} of {len(records)} volumes scored; priority list: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
