"""The calibrated importance mode: its maths against a plain scipy transcription, its millimetre opening,
its border band, its per-organ normalisation, and its mode carried by the scorer, the config and the
score record (a change of mode re-scores; the reference's records are left as they were)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from lib.importance.calibrated import CANDIDATE_P, PRIOR_ML, U_THRESHOLD, compute_calibrated, opening_radii
from lib.importance.epistemic import binary_entropy, mean_binary_entropy


def _ball(shape, centre, radius, blur=1.0):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    return 1.0 / (1.0 + np.exp(-(radius - r) / blur))


def _reference(probs, masks, spacing, band_mm, opening_mm):
    """The module docstring, transcribed with scipy on the whole volume (no crop, float64)."""
    gains, masses = [], []
    band = np.ones([2 * max(1, round(band_mm / s)) + 1 for s in spacing], bool)
    opening = opening_radii(opening_mm, spacing)
    for c in range(probs.shape[1]):
        p = probs[:, c].astype(np.float64)
        own = p >= 0.5
        q = np.clip(p.mean(0).astype(np.float32), 1e-6, 1 - 1e-6).astype(np.float64)
        u = -(q * np.log(q) + (1 - q) * np.log(1 - q)) / math.log(2)
        if any(opening):
            box = np.ones([2 * r + 1 for r in opening], bool)
            u = u * ndimage.binary_opening(u * math.log(2) > U_THRESHOLD, structure=box)
        seen = masks[c] | own.any(0) | (p.mean(0) >= CANDIDATE_P)
        inner = ndimage.binary_erosion(masks[c] & own.all(0), structure=band)
        region = ndimage.binary_dilation(seen, structure=band) & ~inner
        m = float((u * region).sum())
        prior = PRIOR_ML * 1000 / np.prod(spacing)
        masses.append(m)
        gains.append(m / (2 * masks[c].sum() + m + prior))
    return masses, gains


def _volume(seed=0):
    rng = np.random.default_rng(seed)
    shape = (28, 24, 20)
    organs = [_ball(shape, (14, 12, 10), 7, 1.5), _ball(shape, (5, 5, 4), 2.5, 0.7), 0.3 * _ball(shape, (22, 18, 15), 3, 1)]
    probs = np.stack([np.stack([np.clip(o + rng.normal(0, 0.03, shape), 0, 1) for o in organs]) for _ in range(2)])
    probs = probs.astype(np.float32)
    masks = probs.mean(0) >= 0.5
    return probs, masks


@pytest.mark.parametrize("spacing,band_mm,opening_mm", [((1.5, 1.5, 1.5), 6.0, 0.0), ((3.0, 3.0, 5.0), 6.0, 7.5),
                                                        ((1.5, 1.5, 1.5), 3.0, 7.5)])
def test_masses_and_gains_equal_a_scipy_transcription_on_the_whole_volume(spacing, band_mm, opening_mm):
    probs, masks = _volume()
    result = compute_calibrated(torch.from_numpy(probs), torch.from_numpy(masks), ["liver", "pancreas", "spleen"],
                                spacing, band_mm=band_mm, opening_mm=opening_mm)
    masses, gains = _reference(probs, masks, spacing, band_mm, opening_mm)
    assert list(result.uncertain_mass.values()) == pytest.approx(masses, rel=1e-5)
    assert list(result.organ_scores.values()) == pytest.approx(gains, rel=1e-5)
    assert result.score == pytest.approx(sum(gains), rel=1e-5)
    assert result.priority == [n for _, n in sorted(zip([-g for g in gains], ["liver", "pancreas", "spleen"]))]


def test_the_opening_is_in_millimetres_so_a_thin_border_shell_survives_only_without_it():
    # The reference's 2 iterations of the 3x3x3 cube are a 7.5 mm opening on the recipe's 1.5 mm grid.
    assert opening_radii(7.5, (1.5, 1.5, 1.5)) == (2, 2, 2)
    # 3 voxels (9 mm) across at 3 mm, but 1 voxel (5 mm) is closer to 7.5 mm than 3 (15 mm) at 5 mm.
    assert opening_radii(7.5, (3.0, 3.0, 5.0)) == (1, 1, 0) and opening_radii(0, (1.5,) * 3) == (0, 0, 0)
    shape = (24, 24, 24)
    organ = _ball(shape, (12, 12, 12), 7, 0.3)  # a sharp border: a shell of doubt 1-2 voxels thick
    probs = torch.from_numpy(np.stack([organ[None]] * 2).astype(np.float32))
    masks = probs.mean(0) >= 0.5
    kept = compute_calibrated(probs, masks, ["liver"], (1.5,) * 3)
    opened = compute_calibrated(probs, masks, ["liver"], (1.5,) * 3, opening_mm=7.5)
    assert kept.uncertain_mass["liver"] > 50 and opened.uncertain_mass["liver"] == 0.0


def test_only_doubt_in_the_band_around_a_predicted_border_counts():
    shape = (32, 24, 24)
    organ = _ball(shape, (8, 12, 12), 5, 0.3)
    haze = np.zeros(shape)
    haze[22:30, 4:20, 4:20] = 0.2  # doubt (entropy of 0.2 is 0.72 bits) far from any organ, below CANDIDATE_P
    near = np.zeros(shape)
    near[14:15, 4:20, 4:20] = 0.2  # the same doubt one voxel beyond the organ's border
    def mass(extra):
        p = np.maximum(organ, extra)[None, None].astype(np.float32)
        return compute_calibrated(torch.from_numpy(p), torch.from_numpy(p[0] >= 0.5), ["liver"], (1.5,) * 3).uncertain_mass["liver"]
    assert mass(haze) == pytest.approx(mass(np.zeros(shape)))
    assert mass(near) > mass(np.zeros(shape)) + 100


def test_a_large_organ_does_not_win_by_its_size_and_an_organ_only_half_seen_comes_first():
    shape = (40, 32, 32)
    big, small = _ball(shape, (14, 16, 16), 11, 1.0), _ball(shape, (34, 8, 8), 3, 1.0)  # the same border blur
    half_seen = 0.4 * _ball(shape, (34, 24, 24), 4, 0.5)  # no model reaches 0.5: the mask misses it
    probs = torch.from_numpy(np.stack([np.stack([big, small, half_seen])]).astype(np.float32))
    result = compute_calibrated(probs, probs[0] >= 0.5, ["liver", "pancreas", "spleen"], (1.5,) * 3)
    mass, gain = result.uncertain_mass, result.organ_scores
    assert mass["liver"] > 3 * mass["pancreas"], "the big organ holds more uncertain voxels"
    assert gain["pancreas"] > 1.3 * gain["liver"], "but stands to lose less of its Dice"
    assert result.mask_voxels["spleen"] == 0 and gain["spleen"] > gain["pancreas"]
    assert result.priority == ["spleen", "pancreas", "liver"]


def test_the_epistemic_entropy_is_the_entropy_of_the_models_mean():
    p = torch.tensor([[[0.5, 0.0, 1.0]], [[0.5, 1.0, 1.0]]])  # (M=2, C=1, 3 voxels)
    h = binary_entropy(p)
    assert h.shape == (1, 3)
    assert float(h[0, 0]) == pytest.approx(math.log(2)) and float(h[0, 1]) == pytest.approx(math.log(2))  # disagreement
    assert float(h[0, 2]) < 2e-5
    assert mean_binary_entropy(p) == pytest.approx(float(h.mean()))


def _scorer(mode="reference", **options):
    from lib.importance.scorer import FixedWeights, VolumeScorer
    from lib.transforms.recipe import Recipe

    return VolumeScorer([], FixedWeights({}), ["liver", "pancreas"], Recipe(), device="cpu", mode=mode, **options)


def test_the_mode_is_in_the_score_records_method_so_a_change_of_mode_or_band_rescores():
    from lib.importance.records import is_current

    reference, calibrated = _scorer(), _scorer("calibrated")
    # The reference's method is what records made before the calibrated mode carry: they stay current.
    assert reference.method() == {"version": 2, "entropy": "positive", "normalise_score": False}
    assert calibrated.method()["mode"] == "calibrated" and calibrated.method()["band_mm"] == 6.0
    stamp = {"size": 1, "mtime": 2}
    record = {"models": {}, "file": stamp, "method": reference.method()}
    assert is_current(record, {}, stamp, reference.method())
    assert not is_current(record, {}, stamp, calibrated.method())
    record["method"] = calibrated.method()
    assert not is_current(record, {}, stamp, _scorer("calibrated", band_mm=3.0).method())
    # Ray's workers build their scorer from the spec: the mode and its options travel with it.
    rebuilt = calibrated.spec().build("cpu")
    assert (rebuilt.mode, rebuilt.band_mm, rebuilt.opening_mm) == ("calibrated", 6.0, 0.0)
    with pytest.raises(ValueError, match="importance mode"):
        _scorer("fancy")


def test_one_conf_key_chooses_the_mode_for_the_server_and_the_offline_ranking():
    from lib.config import ConfError, parse_conf
    from lib.importance.configured import volume_scorer
    from lib.importance.scorer import FixedWeights

    assert parse_conf({}).importance_mode == "calibrated"  # the default since the loop benchmark (issue 22)
    assert parse_conf({"importance_mode": "reference"}).importance_mode == "reference"
    cfg = parse_conf({"importance_mode": "calibrated", "band_mm": "4.5", "opening_mm": "7.5", "models": "segresnet"})
    scorer = volume_scorer(cfg, FixedWeights({}))
    assert (scorer.mode, scorer.band_mm, scorer.opening_mm) == ("calibrated", 4.5, 7.5)
    # The offline ranking's command line goes through the same parse.
    from lib.importance.rank import parser, ranking_config

    args = parser().parse_args(["studies", "--conf", "importance_mode", "calibrated", "--conf", "opening_mm", "7.5"])
    assert (ranking_config(args).importance_mode, ranking_config(args).opening_mm) == ("calibrated", 7.5)
    with pytest.raises(ConfError, match="importance_mode"):
        parse_conf({"importance_mode": "best"})
    with pytest.raises(ConfError, match="band_mm"):
        parse_conf({"band_mm": "-1"})
    with pytest.raises(ConfError, match="diversity_decay"):
        parse_conf({"diversity_decay": "2"})
