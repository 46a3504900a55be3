"""Start-up with missing weights: download what the hub has, say what it lacks, serve anyway."""

from __future__ import annotations

import os

import pytest

from lib.weights import RELEASED_FILES
from support import FileServer, Server, copy_into, hub_path, shared_path, write_synthetic_checkpoint

pytestmark = pytest.mark.server


def test_server_downloads_available_weights_and_starts_without_the_rest(tmp_path):
    ct = shared_path("data", "totalseg-example", "ct.nii.gz")
    copy_into(ct, str(tmp_path / "studies"), "ct.nii.gz")
    seg = write_synthetic_checkpoint("segresnet", str(tmp_path / "hubfiles" / "seg.pth"))
    hub = FileServer({hub_path(RELEASED_FILES["segresnet"]): (open(seg, "rb").read(), None)})
    model_dir = tmp_path / "model"
    srv = Server(
        str(tmp_path / "studies"),
        {"models": "all", "model_dir": str(model_dir), "importance_mode": "reference"},
        str(tmp_path),
        env={"HF_ENDPOINT": hub.url},
    )
    try:
        info = srv.wait_ready().info()
        assert set(info["models"]) == {"segresnet", "ensemble", "attention"}
        w = info["models"]["segresnet"]["weights"]["segresnet"]
        assert w["source"] == "released"
        assert os.path.exists(model_dir / RELEASED_FILES["segresnet"])
        assert info["models"]["ensemble"]["backbones"] == ["segresnet"]
        log = srv.log_tail(400)
        for backbone in ("unet", "swinunetr"):
            line = [ln for ln in log.splitlines() if RELEASED_FILES[backbone] in ln and "unavailable" in ln]
            assert len(line) == 1, log
            assert "weights_dir" in line[0] and str(model_dir) in line[0]
        problems = info["suprem"]["weights"]
        assert "HTTP 404" in problems["unet"]["problem"]
    finally:
        srv.stop()
        hub.close()
