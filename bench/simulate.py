"""Active-learning simulation (issues 5, 15): test Dice against annotation spent, per strategy.

    .venv/bin/python -m bench.simulate --config small --jobs 2         # CPU, 2 cores (bench/RESULTS.md)
    .venv/bin/python -m bench.simulate --config tiny --out /tmp/sim   # a smoke run of a few minutes
    .venv/bin/python -m bench.simulate --config gpu --device cuda     # the recipe's grid, for a GPU

Per seed: phantom CTs (``testing/phantoms.py``) in an unlabelled pool (``balanced``: sites A-D in equal
shares with hard cases; ``realistic``: mostly the starter's own site, a minority of other sites and hard
cases; ``organ_local``: the starter's site, a minority with one organ that does not enhance) and a
balanced held-out test set (sites A-D: contrast phase, noise, spacing, field of view; a share of hard
cases; for ``organ_local``, a test set of its own kind); a starting SegResNet trained with the project's
trainer on a few volumes of one site (the "pre-trained backbone"; ``starters`` distinct ones, seeds use
them in turn, each trained once and cached under bench/out/starters by its settings). Per arm (strategy
x revision mode), each round: the strategy picks volumes (``oracle``: the largest true error, the
positive control; ``random``; ``size``: predicted organ size; ``entropy``: mean entropy, MONAI Label's
``Epistemic``; ``importance``: the app's score and strategy; ``all``: the whole pool at once, the upper
bound), a simulated annotator revises them (the whole volume = ground truth; or organ-level = the listed
organs, through the app's datastore, trained on those organs only), the backbone retrains from the
previous round's model for a fixed number of steps per labelled volume (the starter's own phantoms
labelled from the start with ``replay_starter``), and the test Dice is measured through the app's infer
task.

Writes to ``--out``: ``rounds.csv`` (every round, with each test volume's Dice per organ),
``dice_vs_annotation.png`` (bootstrap 95% bands), ``summary.md`` (the issue's targets, met or not),
``config.json``. Deterministic by seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("TQDM_DISABLE", "1")  # MONAI's dataset progress bars, before tqdm is imported

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench.simulation import report
from bench.simulation.config import PRESETS, get_config, parse_override

DEFAULT_OUT = os.path.join(ROOT, "bench", "out", "simulation")


def _machine(device: str) -> str:
    """The shared bench/machine.py facts, plus the load average (the CPU is shared with other jobs)."""
    import torch

    from bench.machine import machine_facts

    facts = machine_facts(torch.device(device))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{facts['cpu']}; {facts['software']}; device {facts['device']}; load average {load:.2f} at start"


def _parse_arms(text: Optional[str]):
    if not text:
        return None
    arms = []
    for item in text.split(","):
        strategy, _, revision = item.strip().partition("/")
        arms.append((strategy, revision or "volume"))
    return tuple(arms)


def _write_report(rows, meta: Dict, out: str) -> str:
    """The PNG and summary.md of ``rows`` in ``out``; returns the summary (made once: its bootstrap is
    the slow part)."""
    report.plot(rows, os.path.join(out, "dice_vs_annotation.png"), title=f"{meta.get('config', '')}:")
    text = report.summary_markdown(rows, meta)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


def _report_only(out: str) -> int:
    rows = report.read_csv(os.path.join(out, "rounds.csv"))
    with open(os.path.join(out, "run.json")) as f:
        meta = json.load(f)
    print(_write_report(rows, meta, out))
    return 0


def run_seed(cfg, seed: int, work: str, starters: List[str], threads: int, device: str, keep_work: bool,
             start: float, arms=None) -> List:
    """The arms of one seed (default all of ``cfg.arms``) from ``starters`` (the served model's, then its
    companions'), in this process or a worker's;
    returns their rows. The seed's phantoms and round-0 Dice are made again in each call (deterministic)."""
    import torch

    from bench.simulation import loop

    torch.set_num_threads(max(1, threads))
    logging.disable(logging.WARNING)
    loop.DEVICE = device

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f} s] {msg}", flush=True)

    arms = list(arms or cfg.arms)
    tag = "" if arms == list(cfg.arms) else "_" + "_".join(f"{s}-{r}" for s, r in arms)
    try:
        ctx = loop.prepare_seed(cfg, seed, work, starters, log, tag=tag)
        rows: List = []
        for strategy, revision in arms:
            rows += loop.run_arm(cfg, ctx, strategy, revision, log)
    except Exception:  # a worker's exception may not survive pickling (fastapi's HTTPException does not)
        import traceback

        raise RuntimeError(f"seed {seed} failed:\n{traceback.format_exc()}") from None
    if not keep_work:
        shutil.rmtree(ctx.folder, ignore_errors=True)
    return rows


def _run_seeds(cfg, work: str, starters: Dict[int, List[str]], args, start: float):
    """Yields rows as they finish: each seed's arms in this process, or each (seed, arm) in one of
    ``--jobs`` worker processes (so the workers stay busy to the end)."""
    common = (args.threads, args.device, args.keep_work, start)
    if args.jobs <= 1:
        for seed in cfg.seeds:
            yield run_seed(cfg, seed, work, starters[seed], *common)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    todo = [(cfg, seed, work, starters[seed], *common, [arm]) for seed in cfg.seeds for arm in cfg.arms]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        for future in as_completed([pool.submit(run_seed, *job) for job in todo]):
            yield future.result()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="small", choices=sorted(PRESETS), help="preset (default small)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default bench/out/simulation)")
    ap.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    ap.add_argument("--arms", help="override the arms, e.g. importance/volume,random/volume,importance/organ")
    ap.add_argument("--rounds", type=int, help="override the number of rounds")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config field, e.g. --set starter_iters=480 --set finetune_lr=1e-3")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared 2-core machine 2 threads ran slower)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where training and inference run")
    ap.add_argument("--jobs", type=int, default=1,
                    help="seeds run in this many processes at once (each with --threads threads; default 1)")
    ap.add_argument("--keep-work", action="store_true", help="keep the phantoms and models under OUT/work")
    ap.add_argument("--fresh-starter", action="store_true",
                    help="retrain the starting model even if cached (bench/out/starters, keyed by its settings)")
    ap.add_argument("--starter-cache", help="where trained starters are kept (default bench/out/starters)")
    ap.add_argument("--starter", metavar="PTH",
                    help="start from this segresnet checkpoint (released format, e.g. the released SuPreM file) "
                         "instead of training one on phantoms")
    ap.add_argument("--report-only", action="store_true",
                    help="only redraw the PNG and summary from OUT/rounds.csv and OUT/run.json")
    return ap


def _starter(args, cfg, work: str, log):
    """({seed: its models' starting files}, a note on where they came from): ``--starter`` checked (every
    model of every seed starts from it), or the cached ones (``cfg.starters`` distinct)."""
    import torch

    from bench.simulation import loop

    t = time.time()
    if args.starter:
        from lib.networks import validate_checkpoint

        starter = os.path.abspath(args.starter)
        validate_checkpoint("segresnet", starter)
        log(f"starter: given {starter}")
        return {seed: [starter] * cfg.models for seed in cfg.seeds}, f"given: {starter}"
    torch.set_num_threads(max(1, args.threads * args.jobs))  # the seeds' processes have not started yet
    starters = loop.cached_starters(cfg, work, log, cache=args.starter_cache or loop.STARTER_CACHE,
                                    fresh=args.fresh_starter)
    torch.set_num_threads(max(1, args.threads))
    names = sorted({os.path.basename(p) for paths in starters.values() for p in paths})
    return starters, (f"{len(names)} distinct ({', '.join(names)}), seeds in turn; trained once with the settings "
                      f"each is keyed by; {time.time() - t:.0f} s here")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.report_only:
        return _report_only(os.path.abspath(args.out))

    import torch

    torch.set_num_threads(max(1, args.threads))
    import warnings

    # Progress goes to stdout through log(); the libraries' per-iteration INFO lines and deprecation
    # warnings would bury it. Errors still show.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)

    cfg = get_config(args.config, seeds=tuple(args.seeds) if args.seeds else None, arms=_parse_arms(args.arms),
                     rounds=args.rounds)
    for item in args.set:
        cfg = dataclasses.replace(cfg, **parse_override(cfg, item))
    from bench.simulation import loop

    loop.DEVICE = args.device

    out = os.path.abspath(args.out)
    work = os.path.join(out, "work")
    os.makedirs(out, exist_ok=True)
    start = time.time()
    machine = _machine(args.device)

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f} s] {msg}", flush=True)

    log(f"config {cfg.name}: {json.dumps(cfg.as_dict())}")
    log(f"machine: {machine}")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg.as_dict(), f, indent=1)

    starters, starter_note = _starter(args, cfg, work, log)

    organs = loop.labels_of(cfg)
    csv_path = os.path.join(out, "rounds.csv")
    rows: List = []
    for seed_rows in _run_seeds(cfg, work, starters, args, start):
        rows += seed_rows
        report.write_csv(rows, organs, csv_path)  # partial results survive an interruption
    rows.sort(key=lambda r: (r["seed"], cfg.arms.index((r["strategy"], r["revision"])), r["round"]))
    report.write_csv(rows, organs, csv_path)
    wall = time.time() - start
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    meta = {
        "config": cfg.name,
        "command": "python -m bench.simulate " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{machine}, {load_end:.2f} at the end",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "wall_s": f"{wall:.0f}",
        "seeds": ", ".join(str(s) for s in cfg.seeds),
        "starting model": starter_note,
        "time spent": ", ".join(f"{k} {sum(float(r[k]) for r in rows if int(r['round']) > 0):.0f} s"
                                for k in ("train_s", "score_s", "test_s")),
    }
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(meta, f, indent=1)
    summary = _write_report(report.read_csv(csv_path), meta, out)  # as --report-only reads them
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    log(f"done in {wall:.0f} s: {csv_path}, {os.path.join(out, 'dice_vs_annotation.png')}, "
        f"{os.path.join(out, 'summary.md')}")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
