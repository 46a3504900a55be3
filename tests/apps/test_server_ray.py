"""A server configured with ``--conf scoring_engine ray`` hands its re-scoring to (local) Ray workers."""

from __future__ import annotations

import json
import urllib.request

import pytest
from monailabel.client import MONAILabelClient

from testing.phantoms import make_phantom, write_phantom
from lib.weights import RELEASED_FILES
from support import Server, write_synthetic_checkpoint

pytest.importorskip("ray")
pytestmark = pytest.mark.server


def _post(url):
    req = urllib.request.Request(url, data=b"{}", method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def test_server_scores_on_ray_workers_and_next_sample_uses_the_scores(tmp_path):
    studies = tmp_path / "studies"
    for i in range(3):
        write_phantom(make_phantom(70 + i, shape=(48, 48, 32), spacing_mm=(3.0, 3.0, 4.0)), str(studies), f"ph_{i}", None)
    (studies / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    weights = tmp_path / "weights"
    write_synthetic_checkpoint("segresnet", str(weights / RELEASED_FILES["segresnet"]))
    conf = {
        "models": "segresnet",
        "importance_mode": "reference",  # the AbdomenAtlas-8K score this test was written for
        "weights_dir": str(weights),
        "model_dir": str(tmp_path / "model"),
        "use_pretrained_model": "false",
        "overlap": "0",
        "skip_trainers": "true",
        "scoring_engine": "ray",
        "ray_workers": "2",
    }
    srv = Server(str(studies), conf, str(tmp_path))
    try:
        srv.wait_ready()
        run = _post(srv.url + "/scoring/importance?run_sync=true")
        assert run["engine"] == "ray" and run["scored"] == 3 and run["failed"] == 1 and run["lost"] == [], run
        client = MONAILabelClient(srv.url, tmpdir=str(tmp_path))
        objects = client.datastore()["objects"]
        recs = {k: v["image"]["info"]["importance"] for k, v in objects.items()}
        assert "error" in recs["broken"]
        scored = {k: r for k, r in recs.items() if "score" in r}
        assert sorted(scored) == ["ph_0", "ph_1", "ph_2"]
        top = client.next_sample("importance", {"client_id": "a"})
        assert top["id"] in scored and top["score"] == max(r["score"] for r in scored.values())
        # The pre-processed volumes were kept for the next round.
        assert len(list((studies / ".suprem" / "cache" / "score").glob("*/*.pt"))) == 3
        log = open(srv.log_path).read()
        assert "volumes on 2 workers" in log, srv.log_tail()
        assert client.info()["name"]  # still serving
    finally:
        srv.stop()
