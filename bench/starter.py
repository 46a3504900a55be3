"""The benchmark's starting model: train it once (cached by its settings) and report its test Dice.

    .venv/bin/python -m bench.starter --config small                      # train if not cached, then test
    .venv/bin/python -m bench.starter --config small --set starter_site=A,B,C,D --test 12

The starter is what bench/simulate.py and bench/error_capture.py start from (same cache,
``bench/out/starters/starter_<config>_<key>.pth``, key = hash of the settings it depends on). Its test
Dice is measured through the app's infer task (``SuPreMSegmentation``) on ``--test`` mixed-site
phantoms with hard cases (the simulation's test role), per organ and per site.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench.simulation.config import STARTER_FIELDS, get_config, parse_override


def site_dice(model, studies) -> dict:
    """Mean Dice over organs, per site of ``studies`` and over all of them (the infer task's path)."""
    import nibabel as nib
    import numpy as np

    from lib.metrics import organ_dice, summarise

    per_volume = {}
    for s in studies:
        pred = model.predict(s.image)
        per_volume[s.id] = organ_dice(pred, np.asarray(nib.load(s.gt).dataobj), model.class_indices)
    out = {"all": summarise(list(per_volume.values()), model.labels)}
    for site in sorted({s.site for s in studies}):
        out[site] = summarise([per_volume[s.id] for s in studies if s.site == site], model.labels)
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="small", help="a bench/simulation/config.py preset (default small)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--test", type=int, default=12, help="mixed-site test phantoms (default 12)")
    ap.add_argument("--seed", type=int, default=0, help="the test set's seed")
    ap.add_argument("--fresh", action="store_true", help="retrain even if cached")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--starter-cache", help="where trained starters are kept (default bench/out/starters)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "starter_test"))
    args = ap.parse_args(argv)

    import torch

    from bench.simulation import loop
    from bench.simulation.data import make_studies

    torch.set_num_threads(max(1, args.threads))
    logging.disable(logging.WARNING)
    cfg = get_config(args.config)
    for item in args.set:
        cfg = dataclasses.replace(cfg, **parse_override(cfg, item))
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f} s] {msg}", flush=True)

    out = os.path.join(os.path.abspath(args.out), f"{cfg.name}_{cfg.starter_key()}")
    starter = loop.cached_starter(cfg, os.path.join(out, "work"), log, cache=args.starter_cache or loop.STARTER_CACHE,
                                  fresh=args.fresh)
    test = make_studies(os.path.join(out, "test"), os.path.join(out, "test_gt"), "test", args.test, args.seed, cfg)
    model = loop.Model(cfg, os.path.join(out, "model"), starter, os.path.join(out, "split.json"))
    dice = site_dice(model, test)
    result = {"config": cfg.name, "starter": starter, "date": time.strftime("%Y-%m-%d %H:%M"),
              "settings": {k: v for k, v in cfg.as_dict().items() if k in STARTER_FIELDS},
              "test": args.test, "test_seed": args.seed,
              "dice": {site: round(d["mean"], 3) for site, d in dice.items()},
              "dice_per_organ": {o: round(v, 3) for o, v in dice["all"].items() if o != "mean"}}
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    log(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
