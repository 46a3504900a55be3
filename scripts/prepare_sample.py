"""Prepare the demo: a sample study folder of phantom CTs, and weights for the app to serve.

    python scripts/prepare_sample.py --studies sample-data/studies --app apps/suprem

Fills the study folder with phantoms (skipping those already there). Then it looks for the released
SuPreM weights (downloading them when the hub is reachable); when none can be had, it trains starter
SegResNet weights on a separate set of labelled phantoms with the project's own trainer, on the
``demo`` preset (a coarse grid and a small window, so that a few CPU minutes give a model that
segments the phantoms), and measures them through the app's infer task on held-out phantoms. The log
and the starter's sidecar (shown by the server's ``/info/``) say what they are and how well they do.

Prints the server settings the weights need (``--conf preset ... --conf labels ...``) on stdout:
``scripts/demo.sh`` starts the server with them.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lib.classes import CLASS_INDEX, DEFAULT_LABEL_SET, label_set  # noqa: E402
from testing.phantoms import make_sample_studies  # noqa: E402
from lib.files import read_json, write_json_atomic  # noqa: E402
from lib.networks import BACKBONES, validate_checkpoint  # noqa: E402
from lib.transforms.recipe import PRESETS, Recipe  # noqa: E402
from lib.weights import WeightsRegistry  # noqa: E402

logger = logging.getLogger("prepare_sample")

STARTER_PRESET = "demo"
STARTER_LABELS = "atlas9"
# Two crops per step: on a CPU, PyTorch runs a 3-D convolution of one small sample with its own slow
# kernel and a batch of two with oneDNN, so a step of two crops costs about a third of a step of one.
STARTER_BATCH = 2


def train_phantom_starter(registry: WeightsRegistry, work_dir: str, labels: List[str], recipe: Recipe, n: int,
                          iters: int, seed: int, batch: int = STARTER_BATCH) -> str:
    """Starter SegResNet weights (``lib.trainers.starter``) on ``n`` labelled phantoms for about ``iters``
    crops of the recipe's window, ``batch`` crops of one phantom per step; returns the published file."""
    from monailabel.datastore.local import LocalDatastore

    from lib.trainers.starter import train_starter

    studies = os.path.join(work_dir, "studies")
    make_sample_studies(studies, n=n, seed=seed, with_labels=True, label_dir=os.path.join(studies, "labels", "final"))
    datastore = LocalDatastore(studies, extensions=("*.nii.gz",), auto_reload=False)
    return train_starter(datastore, registry, labels, recipe, work_dir, steps=math.ceil(iters / batch),
                         crops_per_step=batch)


def heldout_dice(registry: WeightsRegistry, folder: str, labels: List[str], recipe: Recipe, n: int,
                 seed: int) -> Dict[str, float]:
    """Dice per organ (mean over ``n`` held-out phantoms, one per site in turn) and over organs, of the
    starter through the app's infer task: what the demo's server answers."""
    import nibabel as nib
    import numpy as np

    from lib.infers.segmentation import SuPreMSegmentation
    from lib.metrics import organ_dice, summarise
    from lib.networks.inference import NetworkCache

    label_dir = os.path.join(folder, "labels")
    images = make_sample_studies(folder, n=n, seed=seed, with_labels=True, label_dir=label_dir)
    infer = SuPreMSegmentation(["segresnet"], registry, labels, recipe, NetworkCache())
    classes = [CLASS_INDEX[o] for o in labels]
    per_volume = []
    for image in images:
        _, data = infer({"image": image, "device": "cpu", "skip_writer": "true", "logging": "WARNING"})
        truth = np.asarray(nib.load(os.path.join(label_dir, os.path.basename(image))).dataobj)
        per_volume.append(organ_dice(np.asarray(data["pred"]), truth, classes))
    return {o: round(v, 3) for o, v in summarise(per_volume, labels).items()}


def describe_starter(path: str, recipe: Recipe, labels_name: str, n: int, iters: int, seconds: float,
                     dice: Dict[str, float], n_heldout: int) -> Dict:
    """Add what the starter is to its sidecar (the server's /info/ shows it); returns the sidecar."""
    grid = "x".join(f"{s:g}" for s in recipe.spacing)
    window = "x".join(str(r) for r in recipe.roi)
    sidecar = read_json(path + ".json", {})
    sidecar.update({
        "description": (f"Starter SegResNet trained here on {n} labelled phantoms ({iters} crops, {seconds:.0f} s on "
                        f"the CPU), {labels_name} organs, on the '{STARTER_PRESET}' preset ({grid} mm grid, {window} "
                        f"window): held-out Dice {dice['mean']:.2f} on {n_heldout} phantoms. Not SuPreM: it only "
                        "knows the phantoms."),
        "preset": STARTER_PRESET, "spacing": list(recipe.spacing), "roi": list(recipe.roi), "labels": labels_name,
        "heldout_dice": dice, "heldout_phantoms": n_heldout,
    })
    write_json_atomic(path + ".json", sidecar)
    return sidecar


def server_conf(registry: WeightsRegistry) -> str:
    """The --conf arguments the served weights need: the starter's own preset and labels (also once rounds
    have fine-tuned it), else the recipe."""
    if registry.weights["segresnet"].base_source == "starter":
        starter = read_json(registry.starter_path("segresnet") + ".json", {})
        if starter.get("preset"):
            return f"--conf preset {starter['preset']} --conf labels {starter.get('labels', DEFAULT_LABEL_SET)}"
    return f"--conf preset recipe --conf labels {DEFAULT_LABEL_SET}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", default=os.path.join(ROOT, "sample-data", "studies"))
    p.add_argument("--app", default=os.path.join(ROOT, "apps", "suprem"))
    p.add_argument("--n", type=int, default=12, help="phantom studies in the sample folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--use-pretrained-model", default="true", choices=("true", "false"))
    p.add_argument("--starter-n", type=int, default=8, help="labelled phantoms to train starter weights on")
    # 1200 crops gave held-out Dice 0.54 on an Intel CPU but 0.45-0.49 on an AMD EPYC (AVX2): the training
    # path differs with the CPU's kernels; 1800 crops clear 0.5 there with room (bench/RESULTS.md).
    p.add_argument("--starter-iters", type=int, default=1800, help="training crops for the starter weights")
    p.add_argument("--starter-batch", type=int, default=STARTER_BATCH, help="crops per training step")
    p.add_argument("--heldout", type=int, default=4, help="held-out phantoms the starter is measured on")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")

    made = make_sample_studies(args.studies, n=args.n, seed=args.seed)
    logger.info(f"Sample study folder {args.studies}: {len(made)} phantom CTs")

    registry = WeightsRegistry(os.path.join(args.app, "model"), validate_checkpoint,
                               use_pretrained_model=args.use_pretrained_model == "true")
    released = [b for b in BACKBONES if registry.resolve(b).base_source == "released"]
    if released:
        logger.info(f"Released SuPreM weights available for {', '.join(released)}: the server will use them")
    elif registry.weights["segresnet"].base_source == "starter":
        info = registry.info("segresnet")
        logger.info(f"Starter weights already present: {registry.starter_path('segresnet')}. "
                    f"{info.get('description', '')}")
    else:
        logger.info("No released SuPreM weights reachable: training starter SegResNet weights on phantoms "
                    "(CPU, a few minutes)")
        work = os.path.join(os.path.dirname(os.path.abspath(args.studies)), "starter-train")
        recipe, labels = PRESETS[STARTER_PRESET], label_set(STARTER_LABELS)
        start = time.time()
        path = train_phantom_starter(registry, work, labels, recipe, args.starter_n, args.starter_iters,
                                     10_000 + args.seed, args.starter_batch)
        seconds = time.time() - start
        registry.resolve("segresnet")
        dice = heldout_dice(registry, os.path.join(work, "heldout"), labels, recipe, args.heldout, 20_000 + args.seed)
        sidecar = describe_starter(path, recipe, STARTER_LABELS, args.starter_n, args.starter_iters, seconds, dice,
                                   args.heldout)
        logger.info(sidecar["description"])
        logger.info(f"Held-out Dice per organ: {dice}")
    print(server_conf(registry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
