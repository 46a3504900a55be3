"""The offline demo (scripts/prepare_sample.py, then the server demo.sh starts): starter weights trained
on phantoms say what they are, the server runs them on the grid they were trained on, and /info/ shows
it. How well a full-length starter segments is measured by bench/ (bench/RESULTS.md), not here: this
test trains a few crops only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient

from lib.metrics import organ_dice
from lib.classes import CLASS_INDEX, LABEL_SETS
from lib.config import parse_conf
from support import Server

pytestmark = pytest.mark.server

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ATLAS9 = [CLASS_INDEX[o] for o in LABEL_SETS["atlas9"]]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    app = root / "app"
    app.mkdir()
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "prepare_sample.py"), "--studies", str(root / "studies"),
         "--app", str(app), "--n", "2", "--use-pretrained-model", "false", "--starter-n", "2",
         "--starter-iters", "4", "--heldout", "1"],
        capture_output=True, text=True, timeout=900, cwd=str(root),
        env=dict(os.environ, TQDM_DISABLE="1", HF_ENDPOINT="http://127.0.0.1:9"),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return root, app, proc


def test_prepare_prints_the_conf_the_starter_needs_and_says_what_it_is(prepared):
    root, app, proc = prepared
    assert proc.stdout.strip().splitlines()[-1] == "--conf preset demo --conf labels atlas9"
    sidecar = json.loads((app / "model" / "starter_segresnet.pth.json").read_text())
    assert sidecar["preset"] == "demo" and sidecar["labels"] == "atlas9"
    assert sidecar["spacing"] == [4.0, 4.0, 6.0] and sidecar["roi"] == [32, 24, 32]
    assert 0.0 <= sidecar["heldout_dice"]["mean"] <= 1.0 and sidecar["heldout_phantoms"] == 1
    assert f"held-out Dice {sidecar['heldout_dice']['mean']:.2f}" in sidecar["description"]
    assert sidecar["description"] in proc.stderr, "the log says what the weights are"


def test_reported_heldout_dice_is_the_infer_tasks_dice(prepared):
    """The held-out Dice in the sidecar equals Dice recomputed here (the simulation's own Dice code) from
    the app's infer task on the same held-out phantom."""
    root, app, _ = prepared
    from lib.infers.segmentation import SuPreMSegmentation
    from lib.networks import validate_checkpoint
    from lib.networks.inference import NetworkCache
    from lib.transforms.recipe import PRESETS
    from lib.weights import WeightsRegistry

    registry = WeightsRegistry(str(app / "model"), validate_checkpoint, use_pretrained_model=False)
    registry.resolve("segresnet")
    infer = SuPreMSegmentation(["segresnet"], registry, LABEL_SETS["atlas9"], PRESETS["demo"], NetworkCache())
    heldout = root / "starter-train" / "heldout"
    [image] = sorted(heldout.glob("*.nii.gz"))
    _, data = infer({"image": str(image), "device": "cpu", "skip_writer": "true", "logging": "WARNING"})
    truth = np.asarray(nib.load(str(heldout / "labels" / image.name)).dataobj)
    dice = organ_dice(np.asarray(data["pred"]), truth, ATLAS9)
    sidecar = json.loads((app / "model" / "starter_segresnet.pth.json").read_text())
    reported = [sidecar["heldout_dice"][o] for o in LABEL_SETS["atlas9"]]
    defined = np.isfinite(dice) & (truth[..., None] == np.array(ATLAS9)).any(axis=(0, 1, 2))
    assert np.allclose(np.array(reported)[defined], dice[defined], atol=2e-3)
    assert sidecar["heldout_dice"]["mean"] == pytest.approx(np.mean(np.array(reported)[defined]), abs=2e-3)


def test_server_with_the_printed_conf_serves_the_starter_and_says_so(prepared, tmp_path):
    root, app, proc = prepared
    conf = proc.stdout.strip().splitlines()[-1].split()
    conf = dict(zip(conf[1::3], conf[2::3]))
    srv = Server(str(root / "studies"), {"models": "segresnet", "use_pretrained_model": "false",
                                         "model_dir": str(app / "model"), **conf}, str(tmp_path))
    try:
        srv.wait_ready()
        client = MONAILabelClient(srv.url, tmpdir=str(tmp_path))
        info = client.info()
        weights = info["suprem"]["weights"]["segresnet"]
        assert weights["file"].endswith("starter_segresnet.pth") and "Starter SegResNet" in weights["description"]
        assert "misfit" not in weights
        assert info["suprem"]["conf"]["preset"] == "demo" and info["suprem"]["conf"]["labels"] == "atlas9"
        image_id = sorted(os.path.basename(p)[: -len(".nii.gz")] for p in (root / "studies").glob("*.nii.gz"))[0]
        label_file, _ = client.infer("segresnet", image_id, {})
        values = set(np.unique(np.asarray(nib.load(label_file).dataobj)).tolist())
        assert values <= {0, *ATLAS9}
    finally:
        srv.stop()


def test_starter_on_the_wrong_grid_is_flagged(prepared):
    from lib.app import weights_misfits
    from lib.networks import validate_checkpoint
    from lib.weights import WeightsRegistry

    _, app, _ = prepared
    registry = WeightsRegistry(str(app / "model"), validate_checkpoint, use_pretrained_model=False)
    registry.resolve("segresnet")
    assert weights_misfits(registry, parse_conf({"models": "segresnet", "preset": "demo"})) == {}
    why = weights_misfits(registry, parse_conf({"models": "segresnet", "preset": "recipe"}))["segresnet"]
    assert "4x4x6 mm" in why and "1.5x1.5x1.5 mm" in why and "preset demo" in why
