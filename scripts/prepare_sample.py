"""Prepare the demo: a sample study folder of phantom CTs, and weights for the app to serve.

    python scripts/prepare_sample.py --studies sample-data/studies --app apps/suprem

Fills the study folder with phantoms (skipping those already there). Then it looks for the released
SuPreM weights (downloading them when the hub is reachable); when none can be had, it trains starter
SegResNet weights on a separate set of labelled phantoms with the project's own trainer, so that the
demo's infer works offline. The log says which weights the server will run on.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib.networks import validate_checkpoint  # noqa: E402
from lib.classes import DEFAULT_LABEL_SET, label_set  # noqa: E402
from lib.data.phantoms import make_sample_studies  # noqa: E402
from lib.networks import BACKBONES  # noqa: E402
from lib.transforms.recipe import PRESETS  # noqa: E402
from lib.weights import WeightsRegistry  # noqa: E402

logger = logging.getLogger("prepare_sample")


def train_starter(registry: WeightsRegistry, work_dir: str, n: int, epochs: int, roi: int, seed: int) -> str:
    """Train starter SegResNet weights on ``n`` labelled phantoms; returns the published file."""
    from monailabel.datastore.local import LocalDatastore

    from lib.trainers.segmentation import SuPreMTrainer

    studies = os.path.join(work_dir, "studies")
    labels = os.path.join(studies, "labels", "final")
    make_sample_studies(studies, n=n, seed=seed, with_labels=True, label_dir=labels)
    datastore = LocalDatastore(studies, extensions=("*.nii.gz",), auto_reload=False)
    trainer = SuPreMTrainer(
        "segresnet",
        registry,
        label_set(DEFAULT_LABEL_SET),
        PRESETS["recipe"],
        model_dir=os.path.join(work_dir, "model"),
        split_file=os.path.join(work_dir, "split.json"),
        roi=(roi, roi, roi),
        max_epochs=epochs,
        val_fraction=0.0,
        publish_to=registry.starter_path("segresnet"),
    )
    start = time.time()
    result = trainer(
        {"name": "starter", "max_epochs": epochs, "source": "starter (phantoms)", "device": "cpu"}, datastore
    )
    logger.info(f"Starter weights trained in {time.time() - start:.0f} s on {n} phantoms: {result.get('published')}")
    return result["published"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", default=os.path.join(ROOT, "sample-data", "studies"))
    p.add_argument("--app", default=os.path.join(ROOT, "apps", "suprem"))
    p.add_argument("--n", type=int, default=12, help="phantom studies in the sample folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--use-pretrained-model", default="true", choices=("true", "false"))
    p.add_argument("--starter-n", type=int, default=6, help="labelled phantoms to train starter weights on")
    p.add_argument("--starter-epochs", type=int, default=20)
    p.add_argument("--starter-roi", type=int, default=64)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")

    made = make_sample_studies(args.studies, n=args.n, seed=args.seed)
    logger.info(f"Sample study folder {args.studies}: {len(made)} phantom CTs")

    model_dir = os.path.join(args.app, "model")
    registry = WeightsRegistry(model_dir, validate_checkpoint, use_pretrained_model=args.use_pretrained_model == "true")
    released = [b for b in BACKBONES if registry.resolve(b).base_source == "released"]
    if released:
        logger.info(f"Released SuPreM weights available for {', '.join(released)}: the server will use them")
        return 0
    if registry.weights["segresnet"].base_source == "starter":
        logger.info(f"Starter weights already present: {registry.starter_path('segresnet')}")
        return 0
    logger.info("No released SuPreM weights reachable: training starter SegResNet weights on phantoms (CPU, minutes)")
    train_starter(
        registry,
        os.path.join(os.path.dirname(os.path.abspath(args.studies)), "starter-train"),
        args.starter_n,
        args.starter_epochs,
        args.starter_roi,
        seed=10_000 + args.seed,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
