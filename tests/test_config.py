"""``--conf tf32``, ``compile``, ``channels_last``: parsed into the recipe (tf32 applied by the sliding window;
absent leaves torch's default)."""

from __future__ import annotations

import pytest
import torch

from lib.config import ConfError, parse_conf
from lib.networks.inference import set_tf32, sliding_window_probs
from lib.transforms.recipe import PRESETS


def _precisions():
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.fixture
def restore_precisions():
    before = _precisions()
    yield
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before
    else:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_tf32_conf_goes_into_the_recipe_and_is_checked():
    assert parse_conf({}).recipe.tf32 is None
    assert parse_conf({"tf32": "false"}).recipe.tf32 is False
    assert parse_conf({"tf32": "true", "preset": "fast"}).recipe.tf32 is True
    assert parse_conf({"preset": "fast"}).recipe.sw_batch_size == 16
    with pytest.raises(ConfError, match="tf32"):
        parse_conf({"tf32": "sometimes"})


def test_the_sliding_window_applies_the_recipes_tf32_and_none_leaves_torchs_default(restore_precisions):
    default = _precisions()
    net = torch.nn.Conv3d(1, 2, 1)
    image = torch.rand(1, 8, 8, 8)
    recipe = PRESETS["recipe"].with_overrides(roi=(8, 8, 8))
    sliding_window_probs(net, image, recipe, torch.device("cpu"))
    assert _precisions() == default
    sliding_window_probs(net, image, recipe.with_overrides(tf32=False), torch.device("cpu"))
    assert _precisions() in (("ieee", "ieee"), (False, False))
    set_tf32(True)
    assert _precisions() in (("tf32", "tf32"), (True, True))


@pytest.mark.parametrize("key", ["compile", "channels_last"])
def test_compile_and_channels_last_are_opt_in_recipe_switches(key):
    assert getattr(parse_conf({}).recipe, key) is False
    assert getattr(parse_conf({key: "true", "preset": "fast"}).recipe, key) is True
    with pytest.raises(ConfError, match=key):
        parse_conf({key: "maybe"})


def test_random_strategy_conf_says_what_answers_a_next_sample_asking_random(tmp_path):
    """OHIF's panel (MONAI Label 0.8.5) asks ``random`` whatever its Strategy list shows, and sends no
    ``client_id``: ``--conf random_strategy importance`` answers such a request with the importance strategy
    itself (the one whose organ hand-outs a later save is read against), while a request that carries the
    key, as MONAI Label's client and the 3D Slicer plugin always send it (null without an id), gets MONAI
    Label's Random; by default Random answers everyone; other values: named."""
    from monailabel.tasks.activelearning.random import Random

    from lib.app import build_tasks, checked_local_datastore
    from lib.classes import CLASS_INDEX
    from support import tiny_studies

    def strategies(**conf):
        settings = {"models": "segresnet", "weights_dir": str(tmp_path / "w"), "use_pretrained_model": "false", **conf}
        return build_tasks(str(tmp_path / "app"), str(studies), settings).strategies

    studies, _ = tiny_studies(tmp_path, n=2)
    datastore = checked_local_datastore(str(studies), CLASS_INDEX.values())
    default = strategies()
    assert isinstance(default["random"], Random) and default["random"] is not default["importance"]
    served = strategies(random_strategy="importance")
    panel = served["random"]({"strategy": "random"}, datastore)  # OHIF's panel: only its list's params
    assert panel["id"] in ("im0", "im1") and "scored" in panel and "weight" not in panel, panel
    slicer = served["random"]({"strategy": "random", "client_id": None}, datastore)
    assert slicer["id"] in ("im0", "im1") and "weight" in slicer and "scored" not in slicer, slicer
    named = served["random"]({"strategy": "random", "client_id": "reader-2"}, datastore)
    assert "weight" in named and "scored" not in named, named
    with pytest.raises(ConfError, match="random_strategy 'first'.*random, importance"):
        parse_conf({"random_strategy": "first"})
