"""The active-learning simulation (bench/simulate.py): a tiny run produces a consistent CSV, a PNG and
a summary. Who wins is not checked here; bench/RESULTS.md reports that."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from bench.simulation import report
from bench.simulation.annotator import organ_revision
from bench.simulation.config import PRESETS, get_config
from lib.metrics import organ_dice, summarise
from lib.classes import CLASS_INDEX, LABEL_SETS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = PRESETS["tiny"]
ORGANS = LABEL_SETS[TINY.labels]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("simulation")
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.simulate", "--config", "tiny", "--out", str(out),
         "--starter-cache", str(out / "starters")],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_tiny_config_is_two_rounds_of_every_kind_of_arm_on_one_seed():
    assert TINY.rounds == 2 and len(TINY.seeds) == 1 and TINY.models == 2
    assert {s for s, _ in TINY.arms} == {"importance", "random", "entropy", "oracle", "size", "all"}


def test_csv_has_one_consistent_row_per_seed_strategy_and_round(tiny_run):
    with open(tiny_run / "rounds.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        raw = list(reader)
    assert header == report.columns(ORGANS)
    assert all(len(r) == len(header) for r in raw)
    rows = [dict(zip(header, r)) for r in raw]
    keys = [(r["seed"], r["strategy"], r["revision"], int(r["round"])) for r in rows]
    # The upper bound ("all") is one round that revises the whole pool; every other arm has every round.
    assert len(keys) == len(set(keys)) == len(TINY.seeds) * ((len(TINY.arms) - 1) * (TINY.rounds + 1) + 2)
    by_arm = defaultdict(list)
    for r in rows:
        by_arm[(r["seed"], r["strategy"], r["revision"])].append(r)
    assert set(k[1:] for k in by_arm) == set(TINY.arms)
    for (_, strategy, revision), arm_rows in by_arm.items():
        arm_rows.sort(key=lambda r: int(r["round"]))
        if strategy == "all":
            assert [int(r["volumes_revised"]) for r in arm_rows] == [0, TINY.n_pool]
            continue
        assert [int(r["round"]) for r in arm_rows] == list(range(TINY.rounds + 1))
        vols = [int(r["volumes_revised"]) for r in arm_rows]
        orgs = [int(r["organs_revised"]) for r in arm_rows]
        assert vols[0] == 0 and orgs[0] == 0
        assert all(b > a for a, b in zip(vols, vols[1:])), "revised volumes increase every round"
        assert all(b >= a for a, b in zip(orgs, orgs[1:])), "revised organs never decrease"
        per_round = TINY.volumes_per_round if revision == "volume" else TINY.organ_volumes_per_round
        assert vols[-1] == per_round * TINY.rounds
        if revision == "volume":
            assert orgs == [v * len(ORGANS) for v in vols], "a whole volume revises every organ"
            assert all(b > a for a, b in zip(orgs, orgs[1:]))
        else:
            assert orgs[-1] <= vols[-1] * TINY.organs_per_volume
        # The model-scored arms score with the served model and its companion; the others read no model.
        scored = {"importance": 2, "entropy": 2, "size": 2}.get(strategy, 0)
        assert [int(r["scored_by"]) for r in arm_rows[1:]] == [scored] * (len(arm_rows) - 1), strategy
        # Round 0 is the same starting model for every arm.
        assert arm_rows[0]["test_mean_dice"] == rows[0]["test_mean_dice"]
        assert len([p for p in arm_rows[-1]["picked"].split() if p]) == per_round
    for r in rows:
        mean = float(r["test_mean_dice"])
        assert 0.0 <= mean <= 1.0
        organ_values = [float(r[f"dice_{o}"]) for o in ORGANS if r[f"dice_{o}"] != ""]
        assert organ_values and all(0.0 <= v <= 1.0 for v in organ_values)
        assert math.isclose(mean, float(np.mean(organ_values)), abs_tol=1e-3)
        # The per-volume table the intervals resample gives back the row's mean.
        table = report.volume_table(r)
        assert table.shape == (TINY.n_test, len(ORGANS))
        assert math.isclose(mean, report._mean_dice(table), abs_tol=1e-3)


def test_png_is_a_valid_image_and_summary_states_the_target(tiny_run):
    png = tiny_run / "dice_vs_annotation.png"
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 200
    summary = (tiny_run / "summary.md").read_text()
    assert "## Targets" in summary and "random" in summary and "- Volumes (" in summary and "- Organs (" in summary
    assert "Mean entropy" in summary and "bootstrap 95% interval" in summary
    assert "- models scoring the pool: importance / volume 2" in summary
    assert "- Positive control (" in summary and "| oracle / volume |" in summary and "paired 95%" in summary
    assert not (tiny_run / "work").exists(), "scratch phantoms and models are removed"


# --- the pieces, without training ---------------------------------------------------------------------
def test_annotation_to_reach_interpolates_between_rounds():
    x, y = [0, 2, 4, 6], [0.1, 0.3, 0.5, 0.6]
    assert report.annotation_to_reach(x, y, 0.4) == pytest.approx(3.0)
    assert report.annotation_to_reach(x, y, 0.05) == 0.0
    assert report.annotation_to_reach(x, y, 0.6) == pytest.approx(6.0)
    assert report.annotation_to_reach(x, y, 0.7) is None
    # first crossing, even if the curve dips afterwards
    assert report.annotation_to_reach([0, 1, 2, 3], [0.1, 0.5, 0.2, 0.6], 0.3) == pytest.approx(0.5)


def _rows(arms, seeds=(0, 1), rounds=4):
    """Rows of known curves: arms = {(strategy, revision): (volumes per round, organs per round, dice per round)}."""
    rows = []
    for seed in seeds:
        for (strategy, revision), (v, o, d) in arms.items():
            for rnd in range(rounds):
                dice = d(seed, rnd) if callable(d) else d * rnd
                rows.append({"seed": seed, "strategy": strategy, "revision": revision, "round": rnd,
                             "volumes_revised": v * rnd, "organs_revised": o * rnd, "test_mean_dice": dice})
    return rows


def test_target_comparison_on_known_curves():
    rows = _rows({("random", "volume"): (2, 50, 0.1), ("importance", "volume"): (2, 50, 0.2),
                  ("importance", "organ"): (4, 20, 0.15), ("entropy", "volume"): (2, 50, 0.1)})
    t = report.target_comparison(rows)
    # Volumes: random ends at 0.3 with 6 volumes; importance reaches 0.3 at 3 volumes: 50% fewer.
    assert t["volumes"]["target_dice"] == pytest.approx(0.3)
    assert t["volumes"]["needed"] == pytest.approx(3.0)
    assert t["volumes"]["saving"] == pytest.approx(0.5)
    assert t["volumes"]["seeds_met"] == 2 and t["volumes"]["met"]
    # Organs: whole-volume importance ends at 0.6 with 150 organs; organ-level reaches only 0.45.
    assert t["organs"]["target_dice"] == pytest.approx(0.6)
    assert t["organs"]["reference_spent"] == pytest.approx(150.0)
    assert t["organs"]["needed"] is None and not t["organs"]["met"]
    assert t["entropy"]["saving"] == pytest.approx(0.0)
    summary = report.summary_markdown(rows, {"config": "test"})
    assert "Volumes (**met**" in summary and "saving 50%" in summary and "Organs (**not met**" in summary


def test_organ_target_is_the_whole_volume_arms_final_dice_in_organs():
    rows = _rows({("importance", "volume"): (2, 50, 0.2), ("importance", "organ"): (4, 20, 0.3)})
    o = report.target_comparison(rows)["organs"]
    # 0.6 after 150 organs; organ level: 0.6 at round 2 = 40 organs -> 73% fewer.
    assert o["needed"] == pytest.approx(40.0) and o["saving"] == pytest.approx(1 - 40 / 150) and o["met"]


def test_the_volume_target_needs_four_of_five_seeds():
    # Importance is 50% cheaper in seeds 0-2 and no better than random in seeds 3-4: not met.
    good = lambda seed, rnd: (0.2 if seed < 3 else 0.1) * rnd  # noqa: E731
    rows = _rows({("random", "volume"): (2, 50, 0.1), ("importance", "volume"): (2, 50, good)}, seeds=range(5))
    v = report.target_comparison(rows)["volumes"]
    assert v["seeds_met"] == 3 and not v["met"]
    rows = _rows({("random", "volume"): (2, 50, 0.1), ("importance", "volume"): (2, 50, 0.2)}, seeds=range(5))
    assert report.target_comparison(rows)["volumes"]["met"]


def test_bootstrap_interval_resamples_seeds_and_test_volumes():
    rng = np.random.default_rng(0)
    same = [np.full((10, 3), 0.5) for _ in range(5)]
    assert report.bootstrap_interval(same, rng, n=200) == pytest.approx((0.5, 0.5))
    spread = [rng.uniform(0, 1, size=(10, 3)) for _ in range(5)]
    point = np.mean([report._mean_dice(t) for t in spread])
    lo, hi = report.bootstrap_interval(spread, rng, n=500)
    assert lo < point < hi and hi - lo > 0.05
    # One seed: the interval comes from its test volumes alone.
    lo1, hi1 = report.bootstrap_interval(spread[:1], rng, n=500)
    assert lo1 < report._mean_dice(spread[0]) < hi1 and hi1 - lo1 > 0.05


def test_no_saving_is_claimed_when_random_selection_learnt_nothing():
    rows = []
    for rnd, (rand, imp) in enumerate([(0.30, 0.30), (0.25, 0.28), (0.29, 0.35)]):
        for strategy, d in (("random", rand), ("importance", imp)):
            rows.append({"seed": 0, "strategy": strategy, "revision": "volume", "round": rnd,
                         "volumes_revised": 2 * rnd, "organs_revised": 50 * rnd, "test_mean_dice": d})
    t = report.target_comparison(rows)
    assert t["volumes"]["degenerate"] and t["volumes"]["saving"] is None and not t["volumes"]["met"]
    assert "No measurable saving" in report.summary_markdown(rows, {"config": "test"})


def test_organ_revision_replaces_only_the_listed_organs_by_ground_truth():
    liver, spleen, kidney = CLASS_INDEX["liver"], CLASS_INDEX["spleen"], CLASS_INDEX["kidney_left"]
    gt = np.zeros((4, 4, 1), np.uint8)
    gt[:2, :2] = liver
    gt[2:, 2:] = spleen
    gt[0, 3] = kidney
    pred = np.zeros_like(gt)
    pred[1:3, 1:3] = liver  # shifted liver
    pred[3, 0] = spleen  # spleen in the wrong place
    out = organ_revision(pred, gt, ["liver"])
    assert ((out == liver) == (gt == liver)).all(), "the listed organ becomes the ground truth"
    assert (out == spleen).sum() == 1 and out[3, 0] == spleen, "an unlisted organ keeps the model's answer"
    assert (out == kidney).sum() == 0, "an unlisted organ the model missed stays missed"
    assert (pred == organ_revision(pred, gt, [])).all()


def test_dice_is_nan_only_where_an_organ_is_in_neither_map():
    gt = np.zeros((4, 4, 4), np.uint8)
    pred = np.zeros_like(gt)
    gt[:2] = 1
    pred[:1] = 1
    pred[3] = 2
    d = organ_dice(pred, gt, [1, 2, 3])
    assert d[0] == pytest.approx(2 * 16 / (16 + 32)) and d[1] == 0.0 and np.isnan(d[2])
    s = summarise([d, np.array([1.0, np.nan, np.nan])], ["a", "b", "c"])
    assert s["a"] == pytest.approx((d[0] + 1.0) / 2) and s["b"] == 0.0 and np.isnan(s["c"])
    assert s["mean"] == pytest.approx((s["a"] + s["b"]) / 2)


def test_presets_are_valid_and_organ_level_needs_a_priority():
    for name in PRESETS:
        cfg = get_config(name)
        assert cfg.rounds >= 2 and cfg.seeds
    with pytest.raises(ValueError):
        get_config("tiny", arms=(("random", "organ"),))
    with pytest.raises(ValueError):
        get_config("tiny", n_pool=1)


def _table_rows(arms, seeds=(0, 1, 2), rounds=4, n_test=12, noise=0.05):
    """Rows with per-volume Dice tables: arms = {(strategy, revision): slope per round}; each seed's test
    volumes share one offset per volume (the same for every arm: arms are tested on the same volumes)."""
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        offset = rng.normal(0, noise, size=(n_test, 1))
        for (strategy, revision), slope in arms.items():
            for rnd in range(rounds):
                table = np.clip(0.3 + slope * rnd + offset + np.zeros((n_test, 3)), 0, 1)
                dice = {"mean": report._mean_dice(table), "volumes": table.tolist()}
                rows.append({"seed": seed, "strategy": strategy, "revision": revision, "round": rnd,
                             "volumes_revised": rnd, "organs_revised": 3 * rnd, "dice": dice})
    return rows


def test_paired_bootstrap_sees_a_clear_saving_and_no_difference_between_identical_arms():
    rows = _table_rows({("random", "volume"): 0.05, ("oracle", "volume"): 0.1, ("size", "volume"): 0.05})
    p = report.paired_bootstrap(rows, ("oracle", "volume"), ("random", "volume"), n=300)
    # random ends at 0.45 after 3 volumes; the oracle reaches it at 1.5: a 50% saving.
    assert p["saving"] == pytest.approx(0.5, abs=1e-6)
    assert 0 < p["saving_ci"][0] <= 0.5 <= p["saving_ci"][1]
    assert p["delta_final"] == pytest.approx(0.15, abs=1e-6) and p["delta_ci"][0] > 0
    # Paired: the volumes' offsets cancel, so identical curves differ by exactly 0 in every resample
    # (unpaired resampling would give an interval around 0 as wide as the offsets' spread).
    same = report.paired_bootstrap(rows, ("size", "volume"), ("random", "volume"), n=300)
    assert same["delta_ci"] == pytest.approx((0.0, 0.0), abs=1e-9)
    worse = report.paired_bootstrap(_table_rows({("random", "volume"): 0.05, ("size", "volume"): 0.01}),
                                    ("size", "volume"), ("random", "volume"), n=100)
    assert worse["saving"] == report.NOT_REACHED and worse["saving_ci"][1] == report.NOT_REACHED


def test_positive_control_decides_whether_the_strategy_comparison_counts():
    arms = {("random", "volume"): (1, 3, 0.05), ("importance", "volume"): (1, 3, 0.1)}
    no_control = report.target_comparison(_rows(arms, seeds=range(5)))
    assert no_control["control"] is None
    rows = _rows({**arms, ("oracle", "volume"): (1, 3, 0.05)}, seeds=range(5))
    t = report.target_comparison(rows)
    assert not t["control"]["met"] and t["volumes"]["met"]
    summary = report.summary_markdown(rows, {"config": "test"})
    assert "Positive control (**not met**" in summary and "cannot tell a saving" in summary
    rows = _rows({**arms, ("oracle", "volume"): (1, 3, 0.1)}, seeds=range(5))
    t = report.target_comparison(rows)
    assert t["control"]["met"] and t["control"]["saving"] == pytest.approx(0.5)
    assert "Positive control (**met**" in report.summary_markdown(rows, {"config": "test"})
    assert t["rises"]["met"]
    dips = _rows({("random", "volume"): (1, 3, lambda seed, rnd: [0.5, 0.45, 0.55, 0.6][rnd])})
    assert not report.target_comparison(dips)["rises"]["met"]


def test_a_realistic_pool_is_mostly_the_starters_own_site_without_hard_cases():
    from bench.simulation.data import _realistic_plan

    plan = _realistic_plan(32, "A", ["A", "B", "C", "D"], 0.25, np.random.default_rng(0))
    home = [p for p in plan if p == ("A", None)]
    assert len(plan) == 32 and len(home) == 24
    shifted = [p for p in plan if p != ("A", None)]
    assert {s for s, _ in shifted} >= {"B", "C", "D"} and any(h for _, h in shifted)


def test_an_organ_local_pool_is_the_starters_site_with_one_odd_organ_in_a_share_of_it(tmp_path):
    from bench.simulation.data import _organ_local_plan, pool_studies

    plan = _organ_local_plan(24, "A", 0.25, np.random.default_rng(0))
    assert len(plan) == 24 and plan.count(("A", "hypodense_organ")) == 6 and plan.count(("A", None)) == 18
    # The pool the loop and the error-capture benchmark draw: cfg.shifted_fraction of it with an odd organ.
    cfg = get_config("tiny", n_pool=4, pool="organ_local", shifted_fraction=0.5)
    studies = pool_studies(str(tmp_path / "im"), str(tmp_path / "gt"), 4, 0, cfg)
    odd = [s for s in studies if s.hard]
    assert len(odd) == 2 and all(s.site == "A" and s.odd_organ for s in studies if s.hard)
    assert all(s.tag().endswith(f"({s.odd_organ})") for s in odd)
    assert all(s.odd_organ is None and s.tag().endswith(":-") for s in studies if not s.hard)


def test_organ_drift_separates_revised_from_never_revised_organs():
    def row(rnd, picked, liver, spleen, aorta):
        return {"seed": 0, "strategy": "importance", "revision": "organ", "round": rnd, "picked": picked,
                "dice_liver": liver, "dice_spleen": spleen, "dice_aorta": aorta}

    rows = [row(0, "", "0.5", "0.6", "0.7"), row(1, "p1:A:-[liver|spleen]", "0.6", "0.7", "0.65"),
            row(2, "p2:B:hard[liver]", "0.8", "0.8", "0.6")]
    assert report.revised_organs("p1:A:-[liver|spleen] p2:B:-[aorta]") == ["liver", "spleen", "aorta"]
    d = report.organ_drift(rows, ["liver", "spleen", "aorta"])[("importance", "organ")]
    assert d["revised"] == pytest.approx((0.55, 0.8)) and d["unrevised"] == pytest.approx((0.7, 0.6))
    assert d["handed_out"] == {"liver": 2, "spleen": 1}


def _organ_rows(seeds=(0, 1), n_test=4):
    """Organ-level rows with per-volume tables: liver revised in round 1, spleen in round 2, aorta never;
    the aorta (never revised) loses 0.05 a round on every test volume, the revised organs gain."""
    rows = []
    curves = {"liver": [0.5, 0.7, 0.8], "spleen": [0.6, 0.6, 0.75], "aorta": [0.7, 0.65, 0.6]}
    picked = ["", "p1:A:-[liver]", "p2:B:-[spleen]"]
    for seed in seeds:
        for rnd in range(3):
            offsets = np.linspace(-0.05, 0.05, n_test)[:, None]
            table = np.array([[curves[o][rnd] for o in curves]]) + offsets
            row = {"seed": seed, "strategy": "importance", "revision": "organ", "round": rnd, "picked": picked[rnd],
                   "volume_dice": json.dumps(table.tolist())}
            row.update({f"dice_{o}": str(curves[o][rnd]) for o in curves})
            rows.append(row)
    return rows


def test_unrevised_organs_change_and_revised_by_round_follow_the_hand_outs():
    rows = _organ_rows()
    change, (lo, hi) = report.unrevised_change(rows, ("importance", "organ"), n=200)
    assert change == pytest.approx(-0.1) and lo == pytest.approx(-0.1) and hi == pytest.approx(-0.1)
    # A seed that revised every organ has no never-revised organ: it is left out, not the whole answer.
    everything = [dict(r, seed=9, picked="p3:C:-[liver|spleen|aorta]" if r["round"] == 2 else r["picked"])
                  for r in rows if r["seed"] == 0]
    assert report.unrevised_change(rows + everything, ("importance", "organ"), n=50)[0] == pytest.approx(-0.1)
    by_round = report.revised_by_round(rows, ("importance", "organ"))
    assert [k for k, *_ in by_round] == [0, 1, 2]
    assert math.isnan(by_round[0][1]) and by_round[0][2] == pytest.approx(np.mean([0.5, 0.6, 0.7]))
    assert by_round[1][1:] == pytest.approx((0.7, np.mean([0.6, 0.65])))  # liver revised; spleen, aorta not yet
    assert by_round[2][1:] == pytest.approx((np.mean([0.8, 0.75]), 0.6))
    table = report.organ_gains(rows, [("importance", "organ")])
    liver = next(line for line in table if line.startswith("| liver |"))
    aorta = next(line for line in table if line.startswith("| aorta |"))
    assert "| 0.500 | 2, +0.300 |" in liver and "| 0.700 | 0, -0.100 |" in aorta  # handed out in 2 seeds


def test_the_organ_level_oracle_ranks_partly_revised_volumes_on_their_organs_not_yet_revised(tmp_path):
    from bench.simulation.loop import ORACLE_ORGANS_KEY, _organs_to_revise, _strategy
    from lib.datastore import CheckedLocalDatastore
    from support import tiny_studies

    studies, label = tiny_studies(tmp_path, 3)  # its label: the liver
    ds = CheckedLocalDatastore(str(studies), extensions=["*.nii.gz"], allowed_labels=[CLASS_INDEX[o] for o in ORGANS])
    errors = {"im0": {"liver": 0.9, "spleen": 0.2, "pancreas": 0.1}, "im1": {"liver": 0.5, "spleen": 0.5, "pancreas": 0.0},
              "im2": {"liver": 0.0, "spleen": 0.0, "pancreas": 0.0}}
    for image_id, e in errors.items():
        ds.update_image_info(image_id, {ORACLE_ORGANS_KEY: e})
    pick = _strategy("oracle", "organ", 2)
    assert pick({}, ds) == {"id": "im0"}  # its two worst organs: 1.1 against 1.0
    assert _organs_to_revise("oracle", {"id": "im0"}, ds, 2) == ["liver", "spleen"]
    ds.save_label("im0", label, "final", {"revised": ["liver"]})
    assert pick({}, ds) == {"id": "im1"}, "im0 is left with 0.3: its revised liver counts as no error"
    assert _organs_to_revise("oracle", {"id": "im0"}, ds, 2) == ["spleen", "pancreas"]
    ds.save_label("im1", label, "final", {"revised": ["liver", "spleen"]})
    assert pick({}, ds) == {"id": "im0"}, "partly revised, still in the pool"
    ds.save_label("im0", label, "final", {"revised": ["spleen", "pancreas"]})
    assert pick({}, ds) == {}, "no error left anywhere"


def test_the_excess_oracle_ranks_what_is_unusually_wrong_not_what_is_hard_everywhere():
    from bench.simulation.loop import excess_over_organ_mean

    # The pancreas is bad everywhere (0.6-0.7); the left kidney fails on one image only.
    errors = {"im0": {"pancreas": 0.7, "kidney_left": 0.1}, "im1": {"pancreas": 0.6, "kidney_left": 0.7},
              "im2": {"pancreas": 0.65, "kidney_left": 0.1}}
    excess = excess_over_organ_mean(errors)
    assert excess["im1"]["kidney_left"] == pytest.approx(0.4)
    assert excess["im0"]["pancreas"] == pytest.approx(0.05) and excess["im1"]["pancreas"] == 0.0
    assert max(excess, key=lambda i: max(excess[i].values())) == "im1"
    with pytest.raises(ValueError, match="oracle_organs"):
        get_config("tiny", oracle_organs="gain")
