"""The released-weights download path, against a stand-in hub on 127.0.0.1 (no internet)."""

from __future__ import annotations

import logging
import os

import pytest

from lib.networks import validate_checkpoint
from lib.weights import RELEASED_FILES, WeightsRegistry
from lib.weights.download import DownloadError, download_released
from support import FileServer, free_port, hub_path, write_synthetic_checkpoint

SEG = RELEASED_FILES["segresnet"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    seg = write_synthetic_checkpoint("segresnet", str(d / "seg.pth"))
    unet = write_synthetic_checkpoint("unet", str(d / "unet.pth"))
    return {"segresnet": open(seg, "rb").read(), "unet": open(unet, "rb").read()}


def _validator(backbone):
    return lambda p: validate_checkpoint(backbone, p)


def _leftovers(folder):
    return [f for f in os.listdir(folder) if f.startswith(".download-")]


def test_good_file_is_downloaded_validated_and_kept(tmp_path, checkpoints):
    hub = FileServer({hub_path(SEG): (checkpoints["segresnet"], None)})
    try:
        dest = str(tmp_path / SEG)
        download_released(SEG, dest, hub.url, "MrGiovanni/SuPreM", _validator("segresnet"))
        assert open(dest, "rb").read() == checkpoints["segresnet"]
        assert _leftovers(tmp_path) == []
    finally:
        hub.close()


def test_truncated_download_is_refused_and_leaves_nothing(tmp_path, checkpoints):
    body = checkpoints["segresnet"]
    hub = FileServer({hub_path(SEG): (body[: len(body) // 2], len(body))})
    try:
        with pytest.raises(DownloadError, match="truncated|could not download"):
            download_released(SEG, str(tmp_path / SEG), hub.url, "MrGiovanni/SuPreM", _validator("segresnet"))
        assert not (tmp_path / SEG).exists()
        assert _leftovers(tmp_path) == []
    finally:
        hub.close()


def test_wrong_file_is_refused_by_the_key_manifest(tmp_path, checkpoints):
    hub = FileServer({hub_path(SEG): (checkpoints["unet"], None)})  # a U-Net where SegResNet belongs
    try:
        with pytest.raises(DownloadError, match="not a valid checkpoint"):
            download_released(SEG, str(tmp_path / SEG), hub.url, "MrGiovanni/SuPreM", _validator("segresnet"))
        assert not (tmp_path / SEG).exists()
        assert _leftovers(tmp_path) == []
    finally:
        hub.close()


def test_html_error_page_is_not_taken_for_a_checkpoint(tmp_path):
    hub = FileServer({hub_path(SEG): (b"<html><body>rate limited</body></html>", None)})
    try:
        with pytest.raises(DownloadError, match="not a valid checkpoint"):
            download_released(SEG, str(tmp_path / SEG), hub.url, "MrGiovanni/SuPreM", _validator("segresnet"))
        assert not (tmp_path / SEG).exists()
    finally:
        hub.close()


def test_server_down_gives_one_clear_line_and_backbone_not_offered(tmp_path, caplog):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    reg = WeightsRegistry(str(tmp_path), validate_checkpoint, endpoint=endpoint)
    with caplog.at_level(logging.ERROR, logger="lib.weights.registry"):
        mw = reg.resolve("segresnet")
    assert mw.base is None and not reg.available("segresnet")
    lines = [r.getMessage() for r in caplog.records if SEG in r.getMessage()]
    assert len(lines) == 1
    assert str(tmp_path) in lines[0] and "weights_dir" in lines[0]
    assert _leftovers(tmp_path) == []


def test_registry_prefers_user_weights_dir_and_skips_download(tmp_path, checkpoints):
    wdir = tmp_path / "mine"
    wdir.mkdir()
    (wdir / SEG).write_bytes(checkpoints["segresnet"])
    hub = FileServer({})
    try:
        reg = WeightsRegistry(str(tmp_path / "model"), validate_checkpoint, weights_dir=str(wdir), endpoint=hub.url)
        mw = reg.resolve("segresnet")
        assert mw.base_source == "released" and mw.base == str(wdir / SEG)
        assert hub.hits == []
    finally:
        hub.close()


def test_invalid_user_file_is_reported_and_not_served(tmp_path, checkpoints, caplog):
    wdir = tmp_path / "mine"
    wdir.mkdir()
    (wdir / SEG).write_bytes(checkpoints["unet"])
    reg = WeightsRegistry(str(tmp_path / "model"), validate_checkpoint, weights_dir=str(wdir), use_pretrained_model=False)
    with caplog.at_level(logging.ERROR, logger="lib.weights.registry"):
        mw = reg.resolve("segresnet")
    assert not reg.available("segresnet")
    assert "not a valid segresnet checkpoint" in mw.problem
