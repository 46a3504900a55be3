"""Rank a whole study folder offline: score every CT, write an AbdomenAtlas-style priority CSV.

    python -m lib.importance.rank STUDIES --out ranking.csv [--models all] [--weights-dir DIR]

One JSON record per volume is written (atomically) beside the CSV as it finishes, so an interrupted
run loses at most the volume in progress and a re-run scores only what is missing or stale (other
model files, or a changed image file). The CSV lists volumes by descending score with their organs in
revision order. Ctrl-C (or SIGTERM) stops at once: the CSV is written with the volumes scored so far,
a Ray started here ends with its workers, and the same command run again scores the rest.
"""

from __future__ import annotations

import argparse
import csv
import glob
import logging
import os
import sys
from dataclasses import dataclass
from typing import Dict, List

from lib.files import atomic_open, file_stamp, read_json, write_json_atomic
from lib.importance.engines import ENGINES, InProcessEngine, make_engine, shutdown_ray
from lib.importance.records import is_current, is_scored
from lib.stopping import install_stop_handlers
from lib.transforms.recipe import AMP_MODES, PRESETS

logger = logging.getLogger("lib.importance.rank")

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


@dataclass
class RankRun:
    """What one ``rank_folder`` call did: every volume's record (old and new), and the engine's summary
    of this run (engine, workers, volumes lost with dead workers or never started)."""

    records: Dict[str, Dict]
    summary: Dict

    @property
    def missing(self) -> List[str]:
        """Volumes this run should have scored but did not (workers lost): a re-run scores them."""
        return self.summary.get("lost", []) + self.summary.get("not_started", [])


def write_csv(path: str, records: Dict[str, Dict]) -> None:
    """Priority list: scored volumes by descending score, then failures; written atomically."""
    rows = sorted(
        records.items(), key=lambda kv: ("score" not in kv[1], -float(kv[1].get("score", 0)), kv[0])
    )
    with atomic_open(path, "w", newline="") as f:
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


def rank_folder(scorer, folder: str, out_csv: str, progress: bool = True, engine=None) -> RankRun:
    """Score every study of ``folder`` not already scored by the current models; write the CSV.

    ``engine``: where volumes are scored (``lib.importance.engines``; default: in this process).
    """
    engine = engine or InProcessEngine(scorer)
    parts = out_csv + ".parts"
    os.makedirs(parts, exist_ok=True)
    files = study_files(folder)
    versions = scorer.versions()
    records: Dict[str, Dict] = {}
    for image_id, path in files.items():
        record = read_json(record_path(parts, image_id))
        if record is not None and is_current(record, versions, file_stamp(path)):
            records[image_id] = record
    todo = [image_id for image_id in files if image_id not in records]
    logger.info(f"{len(files)} studies, {len(records)} already scored, {len(todo)} to score ({engine.name})")
    bar = _progress_bar(len(todo)) if progress else None

    def store(image_id: str, record: Dict):
        write_json_atomic(record_path(parts, image_id), record)
        records[image_id] = record
        if "error" in record:
            logger.error(f"{image_id}: {record['error']}")
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{image_id} {record.get('score', 'error')}")

    try:
        run = RankRun(records, engine.run([(i, files[i]) for i in todo], store))
    except KeyboardInterrupt:  # Ctrl-C or a stop signal: the priority list of what is scored so far
        write_csv(out_csv, records)
        raise
    finally:
        if bar is not None:
            bar.close()
    if run.missing:
        logger.error(
            f"{len(run.missing)} volumes not scored (workers lost): {', '.join(run.missing[:20])}; run again to score them"
        )
    write_csv(out_csv, records)
    return run


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="volume", desc="scoring")


def build_scorer(args):
    from lib.networks import validate_checkpoint
    from lib.classes import label_set
    from lib.networks import BACKBONES
    from lib.importance.scorer import VolumeScorer
    from lib.weights import WeightsRegistry

    models = list(BACKBONES) if args.models == "all" else args.models.split(",")
    registry = WeightsRegistry(
        args.model_dir, validate_checkpoint, weights_dir=args.weights_dir, use_pretrained_model=args.download
    )
    for b in models:
        registry.resolve(b)
    tf32 = {"true": True, "false": False}.get(args.tf32)
    recipe = PRESETS[args.preset].with_overrides(
        overlap=args.overlap, sw_batch_size=args.sw_batch_size, amp=args.amp, tf32=tf32
    )
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
    p = argparse.ArgumentParser(prog="python -m lib.importance.rank", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("studies", help="folder of CT files (NIfTI or NRRD)")
    p.add_argument("--out", default="ranking.csv", help="CSV to write (per-volume records go to OUT.parts/)")
    p.add_argument("--models", default="all", help="all, or a comma list of unet,swinunetr,segresnet")
    p.add_argument("--labels", default="atlas25", choices=("atlas25", "atlas9", "all32"))
    p.add_argument("--weights-dir", default=None, help="folder holding the released .pth files")
    p.add_argument("--model-dir", default=os.path.join(root, "apps", "suprem", "model"))
    p.add_argument("--download", action="store_true", help="download missing released weights")
    p.add_argument("--preset", default="recipe", choices=tuple(PRESETS))
    p.add_argument("--overlap", type=float, default=None)
    p.add_argument("--sw-batch-size", type=int, default=None)
    p.add_argument("--amp", default=None, choices=AMP_MODES)
    p.add_argument("--tf32", default=None, choices=("true", "false"), help="TF32 on a GPU (default: torch's)")
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
    install_stop_handlers()  # SIGTERM unwinds like Ctrl-C: the CSV is written, a local Ray is shut down
    try:
        return _rank(args)
    except KeyboardInterrupt:
        print(f"interrupted: the volumes scored so far are in {args.out} (records in {args.out}.parts); "
              "run the same command again to score the rest", file=sys.stderr)
        return 130
    finally:
        shutdown_ray()


def _rank(args) -> int:
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
    run = rank_folder(scorer, args.studies, args.out, progress=not args.no_progress, engine=engine)
    n_ok = sum(1 for r in run.records.values() if is_scored(r))
    print(f"{n_ok} of {len(study_files(args.studies))} volumes scored; priority list: {args.out}")
    if run.missing:
        print(f"{len(run.missing)} volumes were lost with their workers; run the same command again to score them")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
