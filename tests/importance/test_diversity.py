"""The diverse batch (ClaSP PE's class-stratified, Gumbel-noised power sampling): deterministic with a seed,
stratified so that one site's volumes cannot fill a batch, noise that decays over rounds."""

from __future__ import annotations

import numpy as np
import pytest

from lib.importance.diversity import diverse_batch, round_temperature


def _site_dominated_pool():
    """40 volumes: site A's 10 have the 10 highest scores (all of it liver); the others have smaller
    scores spread over pancreas, kidney and aorta. Returns (scores, per-organ scores (N, 4), sites)."""
    rng = np.random.default_rng(7)
    per = np.zeros((40, 4))
    per[:10, 0] = 100 + rng.uniform(0, 10, 10)  # site A: liver, the top of the sorted list
    for i in range(10, 40):
        per[i, 1 + i % 3] = rng.uniform(5, 50)
    sites = ["A"] * 10 + [s for s in "BCD" for _ in range(10)]
    return per.sum(1), per, sites


def test_a_batch_from_a_pool_one_site_dominates_is_not_all_that_site():
    scores, per, sites = _site_dominated_pool()
    top = np.argsort(-scores)[:4]
    assert {sites[i] for i in top} == {"A"}, "the top of one sorted list is all site A"
    for temperature in (0.0, 0.5, 2.0):
        for seed in range(5):
            batch = diverse_batch(scores, 4, temperature, np.random.default_rng(seed), organ_scores=per)
            assert len(set(batch)) == 4
            assert sum(sites[i] == "A" for i in batch) <= 2, (temperature, seed, batch)
    # Stratified by a given label (a site, say) instead of organ scores: one pick per group first.
    batch = diverse_batch(scores, 4, 0.0, np.random.default_rng(0), strata=sites)
    assert sorted(sites[i] for i in batch) == ["A", "B", "C", "D"]


def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    scores, per, _ = _site_dominated_pool()
    one = diverse_batch(scores, 6, 1.0, np.random.default_rng(3), organ_scores=per)
    assert one == diverse_batch(scores, 6, 1.0, np.random.default_rng(3), organ_scores=per)
    others = {tuple(diverse_batch(scores, 6, 1.0, np.random.default_rng(s), organ_scores=per)) for s in range(10)}
    assert len(others) > 1


def test_without_noise_or_strata_it_is_the_top_k_and_noise_follows_the_power_of_the_scores():
    scores = np.array([1.0, 5.0, 3.0, 0.0, 4.0])
    assert diverse_batch(scores, 3, 0.0, np.random.default_rng(0)) == [1, 4, 2]
    assert sorted(diverse_batch(scores, 10, 0.0, np.random.default_rng(0))) == [0, 1, 2, 3, 4]
    assert diverse_batch(scores, 0, 1.0, np.random.default_rng(0)) == []
    # T = 1: the first pick is drawn with probability s / sum(s) (power sampling, exponent 1 / T).
    rng = np.random.default_rng(0)
    firsts = np.bincount([diverse_batch(scores, 1, 1.0, rng)[0] for _ in range(4000)], minlength=5) / 4000
    assert firsts == pytest.approx(scores / scores.sum(), abs=0.03)
    with pytest.raises(ValueError):
        diverse_batch(scores, 2, -1.0, np.random.default_rng(0))


def test_the_temperature_decays_over_rounds():
    assert round_temperature(1.0, 0.5, 0) == 1.0 and round_temperature(1.0, 0.5, 3) == 0.125
    assert round_temperature(0.0, 0.5, 0) == 0.0
