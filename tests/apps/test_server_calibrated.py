"""The calibrated importance mode (the default; ``--conf importance_mode reference`` is the other) and the
diverse batch through a real server: the scoring task's records say which mode made them, and Next Sample
names organs by the calibrated gain."""

from __future__ import annotations

import json
import urllib.request

import pytest
from monailabel.client import MONAILabelClient

from testing.phantoms import make_phantom, write_phantom
from lib.weights import RELEASED_FILES
from support import Server, write_synthetic_checkpoint

pytestmark = pytest.mark.server

PHANTOMS = ["ph_a", "ph_b", "ph_c"]


def test_the_calibrated_mode_scores_ranks_and_names_organs_by_its_gain(tmp_path):
    studies = tmp_path / "studies"
    for i, name in enumerate(PHANTOMS):
        write_phantom(make_phantom(50 + i, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(studies), name, None)
    weights = tmp_path / "weights"
    write_synthetic_checkpoint("segresnet", str(weights / RELEASED_FILES["segresnet"]), seed=0)
    srv = Server(
        str(studies),
        {
            "models": "segresnet",
            "labels": "atlas9",
            "weights_dir": str(weights),
            "model_dir": str(tmp_path / "model"),
            "use_pretrained_model": "false",
            "overlap": "0",
            "diversity_temperature": "1.0",
        },
        str(tmp_path),
        env={"MONAI_LABEL_TASKS_TRAIN": "false"},
    )
    try:
        srv.wait_ready()
        req = urllib.request.Request(srv.url + "/scoring/importance?run_sync=true", data=b"{}", method="POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=600) as r:
            assert json.load(r)["scored"] == len(PHANTOMS)
        client = MONAILabelClient(srv.url)
        records = {k: v["image"]["info"]["importance"] for k, v in client.datastore()["objects"].items()}
        for rec in records.values():
            assert rec["method"]["mode"] == "calibrated" and rec["method"]["band_mm"] == 6.0
            gains = rec["organ_scores"]
            assert isinstance(rec["score"], float) and rec["score"] == pytest.approx(sum(gains.values()), abs=1e-4)
            assert all(0 <= g <= 1 for g in gains.values())
            # Organs to revise: by descending gain (the expected Dice loss), not by size.
            assert rec["organs"] and [gains[o] for o in rec["organs"]] == sorted((gains[o] for o in rec["organs"]), reverse=True)
        answers = [client.next_sample("importance", {"client_id": f"annotator-{k}"}) for k in range(3)]
        assert sorted(a["id"] for a in answers) == sorted(PHANTOMS), "three annotators, three images"
        for a in answers:
            assert a["organs"] == records[a["id"]]["organs"]
    finally:
        srv.stop()
