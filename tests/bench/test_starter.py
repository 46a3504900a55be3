"""bench/starter.py: the starting model is trained once per settings and reused; its test Dice is
reported per site through the infer task."""

from __future__ import annotations

import os

from bench.starter import main


def test_starter_is_cached_by_its_settings_and_tested_per_site(tmp_path, capsys):
    cache = tmp_path / "starters"
    args = ["--config", "tiny", "--test", "4", "--out", str(tmp_path / "out"), "--starter-cache", str(cache)]
    first = main(args)
    assert set(first["dice"]) == {"all", "A", "B", "C", "D"}  # 4 test phantoms, one per site
    assert all(0.0 <= v <= 1.0 for v in first["dice"].values())
    assert os.path.basename(first["starter"]).startswith("starter_tiny_") and os.path.exists(first["starter"])
    capsys.readouterr()
    again = main(args)
    assert "reusing" in capsys.readouterr().out and again["starter"] == first["starter"]
    assert again["dice"] == first["dice"]
    other = main(args + ["--set", "starter_seed=1"])  # a setting it depends on: a new model
    assert other["starter"] != first["starter"] and len(os.listdir(cache)) == 4  # two .pth + two sidecars
