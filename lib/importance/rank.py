"""Rank a whole study folder offline: score every CT, write an AbdomenAtlas-style priority CSV.

    python -m lib.importance.rank STUDIES --out ranking.csv [--models all] [--weights-dir DIR] [--conf KEY VALUE]

Its settings are the server's: every option is a server ``--conf`` key, parsed by the app's own
``lib.config.parse_conf`` with the server's defaults (``--conf`` takes any other key, e.g.
``--conf normalise_score true``), so the CSV ranks as the server does.

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

from lib.config import AppConfig, ConfError, parse_conf
from lib.files import atomic_open, file_stamp, read_json, write_json_atomic
from lib.importance.engines import ENGINES, InProcessEngine, shutdown_ray
from lib.importance.records import is_current, is_scored
from lib.stopping import install_stop_handlers

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
        if record is not None and is_current(record, versions, file_stamp(path), scorer.method()):
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


# Options that are server --conf keys (option dest -> key); --download is use_pretrained_model.
CONF_OPTIONS = {
    "models": "models", "labels": "labels", "weights_dir": "weights_dir", "preset": "preset", "overlap": "overlap",
    "sw_batch_size": "sw_batch_size", "amp": "amp", "tf32": "tf32", "entropy": "entropy", "device": "device",
    "cache_dir": "cache_dir", "engine": "scoring_engine", "ray_address": "ray_address", "workers": "ray_workers",
    "gpus_per_worker": "ray_gpus_per_worker",
}


def ranking_config(args) -> AppConfig:
    """The server's config from the command line: its options and ``--conf`` pairs, through parse_conf."""
    conf = {key: str(getattr(args, dest)) for dest, key in CONF_OPTIONS.items() if getattr(args, dest) is not None}
    conf["use_pretrained_model"] = "true" if args.download else "false"
    conf.update(dict(args.conf))
    return parse_conf(conf)


def build_scorer(cfg: AppConfig, model_dir: str):
    from lib.importance.configured import volume_scorer, weights_registry

    scorer = volume_scorer(cfg, weights_registry(cfg, model_dir), cache_dir=cfg.cache_dir)
    if not scorer.active():
        raise SystemExit(f"no weights for {', '.join(cfg.models)}: pass --weights-dir or --model-dir")
    return scorer


def parser() -> argparse.ArgumentParser:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = argparse.ArgumentParser(prog="python -m lib.importance.rank", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("studies", help="folder of CT files (NIfTI or NRRD)")
    p.add_argument("--out", default="ranking.csv", help="CSV to write (per-volume records go to OUT.parts/)")
    # Server --conf keys (defaults: the server's, from parse_conf).
    p.add_argument("--models", help="all (default), or a comma list of unet,swinunetr,segresnet")
    p.add_argument("--labels", help="a label set of the server's (default atlas25)")
    p.add_argument("--weights-dir", help="folder holding the released .pth files")
    p.add_argument("--download", action="store_true", help="download missing released weights")
    p.add_argument("--preset", help="a server preset (default recipe)")
    p.add_argument("--overlap")
    p.add_argument("--sw-batch-size")
    p.add_argument("--amp")
    p.add_argument("--tf32", help="true/false: TF32 on a GPU (default: torch's)")
    p.add_argument("--entropy", help="positive (default) or binary")
    p.add_argument("--device")
    p.add_argument("--cache-dir", help="keep pre-processed volumes here for the next run (keyed by recipe and file)")
    p.add_argument("--engine", help=f"{' or '.join(ENGINES)}: ray runs one worker per GPU (or CPU core), local "
                   "unless --ray-address")
    p.add_argument("--ray-address", help="join this Ray cluster (auto, ray://host:10001)")
    p.add_argument("--workers", help="Ray workers (default: GPUs, else CPU cores)")
    p.add_argument("--gpus-per-worker", help="default: 1 when Ray has GPUs, else 0")
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="any other server --conf key, e.g. --conf normalise_score true")
    p.add_argument("--model-dir", default=os.path.join(root, "apps", "suprem", "model"))
    p.add_argument("--retries", type=int, default=1, help="Ray: restarts of a dead worker and retries of its volume")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        args.cfg = ranking_config(args)
    except ConfError as e:
        p.error(str(e))
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
    from lib.importance.configured import scoring_engine

    scorer = build_scorer(args.cfg, args.model_dir)
    engine = scoring_engine(scorer, args.cfg, **({"retries": args.retries} if args.cfg.scoring_engine == "ray" else {}))
    run = rank_folder(scorer, args.studies, args.out, progress=not args.no_progress, engine=engine)
    n_ok = sum(1 for r in run.records.values() if is_scored(r))
    print(f"{n_ok} of {len(study_files(args.studies))} volumes scored; priority list: {args.out}")
    if run.missing:
        print(f"{len(run.missing)} volumes were lost with their workers; run the same command again to score them")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
