"""The error-capture benchmark's arithmetic: share of error voxels in the top units of a ranking."""

from __future__ import annotations

import numpy as np
import pytest

from bench.error_capture import capture, capture_table


def test_capture_counts_the_error_of_the_top_units():
    error = np.array([50.0, 30.0, 10.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert capture(error, error, 0.10) == pytest.approx(0.5)  # the oracle's top unit holds half
    assert capture(error, error, 0.20) == pytest.approx(0.8)
    backwards = -error
    assert capture(backwards, error, 0.20) == pytest.approx(0.0)
    # Ties at the cut count their mean error: 2 places among 5 units of equal value.
    flat = np.array([1.0] * 5 + [0.0] * 5)
    assert capture(flat, error, 0.20) == pytest.approx(2 * (100 / 5) / 100)


def test_the_table_puts_the_oracle_first_and_random_at_its_share():
    rng = np.random.default_rng(0)
    error = rng.integers(0, 1000, 200).astype(float)
    rows = [{"error_voxels": e, "noisy": e + rng.normal(0, 300), "anti": -e} for e in error]
    table = {t["ranking"]: t for t in capture_table(rows, ["noisy", "anti", "random", "oracle"])}
    for k in ("top5", "top10", "top20"):
        assert table["oracle"][k] >= table["noisy"][k] > table["random"][k] > table["anti"][k]
    assert table["random"]["top10"] == 0.10 and table["oracle"]["spearman"] == pytest.approx(1.0)
    assert 0.5 < table["noisy"]["spearman"] < 1.0 and table["anti"]["spearman"] == pytest.approx(-1.0)


def test_units_explain_where_the_error_lies_and_the_released_path_runs(tmp_path):
    """A run end to end on two released-format checkpoints (synthetic weights; the GPU configuration's
    path): one row per (volume, organ); error voxels split into what attention covers and the rest."""
    import csv

    from bench.error_capture import main
    from lib.classes import LABEL_SETS
    from lib.weights import RELEASED_FILES
    from testing.synthetic_weights import write_synthetic_checkpoint

    for k, backbone in enumerate(("segresnet", "unet")):
        write_synthetic_checkpoint(backbone, str(tmp_path / "w" / RELEASED_FILES[backbone]), seed=k)
    out = tmp_path / "out"
    assert main(["--config", "tiny", "--released", str(tmp_path / "w"), "--volumes", "2", "--out", str(out),
                 "--set", "labels=atlas9"]) == 0
    with open(out / "units.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 9 and {r["organ"] for r in rows} == set(LABEL_SETS["atlas9"])
    for r in rows:
        error = int(r["error_voxels"])
        assert 0 <= int(r["error_in_attention"]) <= error and 0 <= int(r["confident_error"]) <= error
        # Confident errors lie where no model doubts, so never inside the raw uncertainty.
        assert int(r["error_in_raw_uncertain"]) + int(r["confident_error"]) <= error
        assert 0.0 <= float(r["one_minus_dice"]) <= 1.0
    report = (out / "capture.md").read_text()
    assert RELEASED_FILES["unet"] in report and "## Why" in report and "| site A |" in report
