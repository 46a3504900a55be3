"""The torch attention maps (lib/importance/attention.py) against the numpy+scipy reference.

The reference (testing/attention_reference.py) is the formula of ../shared/suprem/README.md
transcribed organ by organ with scipy.ndimage; the torch version must give the same binary maps voxel
for voxel, the same heat (1e-6), score and organ priority. Inputs are float64 so that both compute in
the same precision (float32 inputs are checked separately, less strictly).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from lib.classes import CLASS_INDEX, LABEL_SETS, OVERLAP_ORGANS, TOTALSEG_TO_SUPREM, mapping_lut
from lib.importance import attention as att
from testing.attention_reference import reference_attention

MAPS = ("uncertain", "inconsistent", "overlap", "attention")
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TOTALSEG_SEG = SHARED / "data" / "totalseg-example" / "seg.nii.gz"

# A mix of overlap organs and vessels (vessels get an O_b but are not "other organs").
NAMES6 = ["liver", "aorta", "stomach", "pancreas", "postcava", "spleen"]


def blobby_probs(rng, n_models, n_organs, shape, sigma=2.5, slope=5.0, disagreement=0.8, model_sigma=4.0):
    """Per-model sigmoid probabilities: smoothed noise shared by the models plus a smoother per-model
    part (each normalised to unit std), through a sigmoid: organs are blobs with an uncertain rim,
    and the models disagree over regions wide enough to survive the opening."""

    def smooth(size, s):
        z = ndimage.gaussian_filter(rng.standard_normal(size), sigma=s, mode="reflect")
        return z / z.std()

    logits = np.empty((n_models, n_organs) + shape)
    for c in range(n_organs):
        base = smooth(shape, sigma)
        for m in range(n_models):
            logits[m, c] = slope * (base + disagreement * smooth(shape, model_sigma) - 0.4)
    return 1.0 / (1.0 + np.exp(-logits))


def case(seed, n_models, shape=(24, 28, 20), names=NAMES6):
    rng = np.random.default_rng(seed)
    probs = blobby_probs(rng, n_models, len(names), shape)
    masks = probs.mean(axis=0) >= 0.5
    # Organ masks touching the border, and a full-border slab on one organ.
    masks[0, :3] = True
    masks[2, :, -2:] = True
    return probs, masks


def run_both(probs, masks, names, model_masks=None, crops=(True, False), **kw):
    """The reference, and the torch version both organ by organ on crops (the CPU default) and
    batched over the whole volume (the CUDA default); both must equal the reference.

    The torch calls use 1 CPU thread: results do not depend on it, and on a 2-core machine shared
    with other busy processes 2 threads made these many small operations several times slower."""
    ref = reference_attention(probs, masks, names, model_masks=model_masks, **kw)
    results = [
        att.compute_attention(
            torch.from_numpy(probs),
            torch.from_numpy(masks),
            names,
            model_masks=None if model_masks is None else torch.from_numpy(model_masks),
            crop=crop,
            num_threads=1,
            **kw,
        )
        for crop in crops
    ]
    for res in results[1:]:
        assert_same(res, ref)
    return results[0], ref


def assert_same(res, ref):
    for key in MAPS:
        got = getattr(res, key).numpy()
        assert got.dtype == bool
        np.testing.assert_array_equal(got, ref[key], err_msg=key)
    np.testing.assert_allclose(res.heat.numpy(), ref["heat"], rtol=0, atol=1e-6)
    assert res.score == ref["score"]
    assert res.attention_voxels == ref["attention_voxels"]
    for name, value in ref["heat_sums"].items():
        assert res.heat_sums[name] == pytest.approx(value, rel=1e-9, abs=1e-9)
    assert res.priority == ref["priority"]


# ------------------------------------------------------------------------------------------------
# Morphology


@pytest.mark.parametrize("shape", [(9, 11, 7), (1, 6, 5), (2, 3, 4), (4, 5, 6), (5, 5, 5)])
@pytest.mark.parametrize("iterations", [1, 2])
def test_morphology_equals_scipy_3x3x3_full_element_with_background_border(shape, iterations):
    rng = np.random.default_rng(sum(shape) + iterations)
    cube = ndimage.generate_binary_structure(3, 3)
    for density in (0.3, 0.8, 1.0):
        x = rng.random((3,) + shape) < density
        xt = torch.from_numpy(x)
        for fn_t, fn_s in (
            (att.binary_dilation, ndimage.binary_dilation),
            (att.binary_erosion, ndimage.binary_erosion),
        ):
            want = np.stack([fn_s(v, structure=cube, iterations=iterations) for v in x])
            np.testing.assert_array_equal(fn_t(xt, iterations).numpy(), want)
        want = np.stack(
            [
                ndimage.binary_dilation(
                    ndimage.binary_erosion(v, cube, iterations=iterations), cube, iterations=iterations
                )
                for v in x
            ]
        )
        np.testing.assert_array_equal(att.binary_opening(xt, iterations).numpy(), want)


def test_erosion_clears_voxels_touching_the_volume_border():
    full = torch.ones((1, 8, 8, 8), dtype=torch.bool)
    eroded = att.binary_erosion(full, iterations=2)[0]
    assert eroded[2:6, 2:6, 2:6].all()
    assert eroded.sum() == 4**3


@pytest.mark.parametrize("size", [1, 7, 8, 255 * 8, 255 * 8 + 8, 255 * 8 * 3 + 40, 13440, 369660])
def test_count_true_equals_sum(size):
    rng = np.random.default_rng(size)
    x = torch.from_numpy(rng.random((3, size)) < 0.7)
    assert att._count_true(x).tolist() == x.sum(dim=1).tolist()
    assert att._count_true(torch.ones((2, size), dtype=torch.bool)).tolist() == [size, size]


# ------------------------------------------------------------------------------------------------
# Equivalence with the reference


@pytest.mark.parametrize("n_models", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_maps_heat_score_priority_equal_reference_on_random_blobs(seed, n_models):
    probs, masks = case(seed, n_models)
    res, ref = run_both(probs, masks, NAMES6)
    assert_same(res, ref)
    # The case is not trivial: every map has voxels in and out, and the border slabs are kept.
    for key in MAPS[:3] if n_models > 1 else ("uncertain", "overlap"):
        frac = ref[key].mean()
        assert 0.001 < frac < 0.9, (key, frac)
    assert float(res.heat.max()) == pytest.approx(1.0)  # normalised by its maximum


def test_organ_chunk_size_does_not_change_the_result():
    probs, masks = case(5, 3)
    ref = reference_attention(probs, masks, NAMES6)
    for chunk in (1, 2, 4, 6):
        res = att.compute_attention(
            torch.from_numpy(probs), torch.from_numpy(masks), NAMES6, crop=False, organ_chunk=chunk, num_threads=1
        )
        assert_same(res, ref)


def test_given_model_masks_are_used_for_the_inconsistency():
    probs, masks = case(7, 3)
    model_masks = probs >= 0.3  # not the default >= 0.5
    res, ref = run_both(probs, masks, NAMES6, model_masks=model_masks)
    assert_same(res, ref)
    default = att.compute_attention(torch.from_numpy(probs), torch.from_numpy(masks), NAMES6)
    assert not torch.equal(default.inconsistent, res.inconsistent)


def test_overlap_counts_only_other_non_vessel_organs():
    shape = (10, 10, 10)
    masks = np.zeros((4,) + shape, dtype=bool)
    names = ["liver", "aorta", "postcava", "kidney_right"]
    masks[0, 2:6] = True  # liver
    masks[1, 4:8] = True  # aorta overlaps liver (4:6) and kidney (6:8)
    masks[2, 4:8] = True  # postcava on the aorta
    masks[3, 6:9] = True  # kidney_right
    probs = np.zeros((1, 4) + shape)  # no uncertainty (entr(0) = 0)
    res, ref = run_both(probs, masks, names)
    assert_same(res, ref)
    o = res.overlap.numpy()
    assert "aorta" not in OVERLAP_ORGANS and "postcava" not in OVERLAP_ORGANS
    assert not o[0].any()  # the liver only meets vessels
    assert not o[3].any()  # the kidney too
    assert o[1, 4:8].all() and o[1].sum() == 4 * 100  # the aorta meets the liver, then the kidney
    assert np.array_equal(o[2], o[1])  # the postcava: the same (the aorta does not count)


def test_single_model_has_no_inconsistency():
    probs, masks = case(3, 1)
    res, ref = run_both(probs, masks, NAMES6)
    assert_same(res, ref)
    assert not res.inconsistent.any()
    assert torch.equal(att.inconsistency(torch.from_numpy(probs)), torch.zeros_like(torch.from_numpy(probs[0])))


def test_no_attention_gives_zero_heat_score_and_input_order():
    shape = (8, 9, 10)
    probs = np.zeros((2, 3) + shape)
    probs[:, 1, 2:5] = 1.0  # certain and agreeing: entr(1) = 0, std = 0
    masks = probs[0] >= 0.5
    res, ref = run_both(probs, masks, ["spleen", "liver", "stomach"])
    assert_same(res, ref)
    assert res.score == 0 and float(res.heat.abs().max()) == 0.0
    assert res.priority == ["spleen", "liver", "stomach"]


def test_organ_priority_scales_each_organ_by_its_own_maximum_as_the_original_code():
    # liver and stomach overlap on a 6^3 cube (heat 1 there: certain, so U = 0); the spleen is uncertain
    # everywhere on a 7^3 cube (p = 0.3: U = entr(0.3) = 0.36, below every overlap voxel's heat). One
    # maximum over all organs ranks the un-normalised sums: liver 216, stomach 216, spleen 124. The
    # original's create_attention.py divides each organ's map by its own maximum and priority_list sums
    # the saved uint8 maps: spleen 343 x 255, liver and stomach 216 x 255.
    shape = (24, 24, 24)
    probs = np.zeros((2, 3) + shape)
    probs[:, 1, 2:10, 2:10, 2:10] = 1.0  # liver
    probs[:, 2, 4:12, 4:12, 4:12] = 1.0  # stomach
    probs[:, 0, 14:21, 14:21, 14:21] = 0.3  # spleen: below 0.5, so no mask and no overlap
    masks = probs[0] >= 0.5
    names = ["spleen", "liver", "stomach"]
    res, ref = run_both(probs, masks, names)
    assert_same(res, ref)
    assert res.priority == ["spleen", "liver", "stomach"]
    assert res.heat_sums == pytest.approx({"spleen": 343.0, "liver": 216.0, "stomach": 216.0})
    assert float(res.heat[0].max()) == 1.0 and float(res.heat[1].max()) == 1.0  # each organ up to 1


# ------------------------------------------------------------------------------------------------
# The real CT: TotalSegmentator labels, three "models" blurred from them.


def _real_case():
    pytest.importorskip("nibabel")
    if not TOTALSEG_SEG.exists():
        pytest.skip(f"shared example segmentation not found at {TOTALSEG_SEG}")
    probs, names = _load_real_case()
    return probs.copy(), list(names)


@functools.lru_cache(maxsize=1)
def _load_real_case():
    import nibabel as nib

    seg = np.asanyarray(nib.load(str(TOTALSEG_SEG)).dataobj).astype(np.int64)
    lut = np.asarray(mapping_lut(TOTALSEG_TO_SUPREM, max_id=int(seg.max())))
    suprem = lut[seg]  # SuPreM class index per voxel, 0 = none
    names = list(LABEL_SETS["atlas25"])
    onehot = np.stack([suprem == CLASS_INDEX[n] for n in names]).astype(np.float64)
    probs = np.stack([ndimage.gaussian_filter(onehot, sigma=(0, s, s, s)) for s in (0.5, 1.5, 3.0)])
    return probs, names


@pytest.mark.parametrize("mask_threshold", [0.5, 0.4])
def test_maps_equal_reference_on_blurred_totalsegmentator_labels(mask_threshold):
    probs, names = _real_case()
    # Ensemble masks: mean >= 0.5 (the README), or a looser 0.4 that makes neighbours overlap.
    masks = probs.mean(axis=0) >= mask_threshold
    # Both torch paths at 0.5; the CPU default (crops) alone at 0.4, to keep the test fast.
    res, ref = run_both(probs, masks, names, crops=(True, False) if mask_threshold == 0.5 else (True,))
    assert_same(res, ref)
    present = [n for n in names if masks[names.index(n)].any()]
    assert len(present) >= 15
    assert ref["uncertain"].any() and ref["inconsistent"].any()
    if mask_threshold < 0.5:
        assert ref["overlap"].any()
    # The CPU default worked on crops much smaller than the volume, and skipped absent organs.
    p_lo = att._entropy_floor("positive", att.U_THRESHOLD)
    scratch = torch.empty(masks.shape[1:], dtype=torch.float64)
    p_t, m_t = torch.from_numpy(probs), torch.from_numpy(masks).view(torch.uint8)
    boxes = [att._active_box(p_t[:, b], m_t[b], None, p_lo, scratch) for b in range(len(names))]
    sizes = [0 if bx is None else np.prod([s.stop - s.start for s in bx]) for bx in boxes]
    assert sum(sizes) < 0.5 * masks.size and sizes.count(0) >= 3


# ------------------------------------------------------------------------------------------------
# Options


def test_binary_entropy_map_is_at_least_the_positive_entropy_map():
    probs, masks = case(11, 3)
    p = torch.from_numpy(probs)
    u_pos, u_bin = att.uncertainty(p, "positive"), att.uncertainty(p, "binary")
    assert bool((u_bin >= u_pos).all()) and bool((u_bin > u_pos).any())
    assert float(u_pos.max()) <= 1 / np.e + 1e-12 and float(u_bin.max()) <= np.log(2) + 1e-12
    pos = att.compute_attention(p, torch.from_numpy(masks), NAMES6)
    res, ref = run_both(probs, masks, NAMES6, entropy="binary")
    assert_same(res, ref)
    assert bool((res.uncertain | ~pos.uncertain).all())  # opening is monotone: U_b grows
    assert res.score >= pos.score


def test_normalised_score_is_sum_of_attention_share_of_mask_plus_attention():
    probs, masks = case(13, 3)
    masks[4] = False  # an organ the ensemble missed: its region is its attention alone
    res, ref = run_both(probs, masks, NAMES6, normalise_score=True)
    assert_same(res, ref)
    raw = att.compute_attention(torch.from_numpy(probs), torch.from_numpy(masks), NAMES6)
    want = 0.0
    for b, name in enumerate(NAMES6):
        a = raw.attention[b].numpy()
        region = (a | masks[b]).sum()
        term = a.sum() / region if region else 0.0
        assert res.organ_scores[name] == pytest.approx(term)
        want += term
    assert isinstance(res.score, float) and res.score == pytest.approx(want)
    assert 0.0 <= res.score <= len(NAMES6)
    assert res.score != raw.score and raw.score == sum(raw.attention_voxels.values())
    assert res.organ_scores["postcava"] in (0.0, 1.0)  # missed organ: all of its region is attention
    assert res.priority == raw.priority  # the priority still follows the heat


# ------------------------------------------------------------------------------------------------
# Viewer helpers, dtypes, devices, argument checks


def test_attention_labels_precedence_overlap_over_inconsistent_over_uncertain():
    probs, masks = case(17, 3)
    res = att.compute_attention(torch.from_numpy(probs), torch.from_numpy(masks), NAMES6)
    lab = att.attention_labels(res).numpy()
    u, c, o = (getattr(res, k).any(dim=0).numpy() for k in ("uncertain", "inconsistent", "overlap"))
    assert lab.dtype == np.uint8 and lab.shape == masks.shape[1:]
    assert np.array_equal(lab == att.LABEL_OVERLAP, o)
    assert np.array_equal(lab == att.LABEL_INCONSISTENT, c & ~o)
    assert np.array_equal(lab == att.LABEL_UNCERTAIN, u & ~c & ~o)
    assert np.array_equal(lab == att.LABEL_NONE, ~(u | c | o))
    assert all((lab == v).any() for v in (0, 1, 2, 3))
    one = att.attention_labels(res, "liver").numpy()
    assert np.array_equal(one > 0, res.attention[0].numpy())
    heat = att.attention_heat(res).numpy()
    assert np.allclose(heat, res.heat.numpy().max(axis=0)) and heat.max() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        att.attention_labels(res, "brain")


def test_float32_input_gives_float32_heat_close_to_float64():
    probs, masks = case(19, 3)
    r64 = att.compute_attention(torch.from_numpy(probs), torch.from_numpy(masks), NAMES6)
    r32 = att.compute_attention(torch.from_numpy(probs).float(), torch.from_numpy(masks), NAMES6)
    assert r32.heat.dtype == torch.float32 and r64.heat.dtype == torch.float64
    n = masks.size
    for key in MAPS:  # thresholds may flip a voxel where U or C is within float32 rounding of them
        assert int((getattr(r32, key) != getattr(r64, key)).sum()) <= n * 1e-4
    assert abs(r32.score - r64.score) <= n * 1e-4
    assert torch.allclose(r32.heat.double(), r64.heat, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_equals_cpu():
    probs, masks = case(23, 3)
    cpu = att.compute_attention(torch.from_numpy(probs), torch.from_numpy(masks), NAMES6)
    gpu = att.compute_attention(torch.from_numpy(probs).cuda(), torch.from_numpy(masks).cuda(), NAMES6)
    for key in MAPS:
        assert torch.equal(getattr(gpu, key).cpu(), getattr(cpu, key)), key
    assert torch.allclose(gpu.heat.cpu(), cpu.heat, atol=1e-9)
    assert gpu.score == cpu.score and gpu.priority == cpu.priority


@pytest.mark.parametrize("crop", [True, False])
def test_num_threads_is_applied_for_the_call_and_restored(monkeypatch, crop):
    """torch runs 2 threads before the call; the maps must be computed with the 1 asked for (seen
    from inside the computation), and the 2 must be back afterwards."""
    probs, masks = case(29, 2)
    seen = []
    organ_maps = att._organ_maps_

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return organ_maps(*args, **kwargs)

    monkeypatch.setattr(att, "_organ_maps_", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.get_num_threads() == 2
        res = att.compute_attention(
            torch.from_numpy(probs), torch.from_numpy(masks), NAMES6, crop=crop, num_threads=1
        )
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}
    assert after == 2
    assert_same(res, reference_attention(probs, masks, NAMES6))


def test_bad_arguments_are_rejected():
    probs, masks = case(0, 2)
    p, m = torch.from_numpy(probs), torch.from_numpy(masks)
    with pytest.raises(ValueError):
        att.compute_attention(p[0], m, NAMES6)
    with pytest.raises(ValueError):
        att.compute_attention(p, m, NAMES6[:-1])
    with pytest.raises(ValueError):
        att.compute_attention(p, m[:-1], NAMES6[:-1] + ["x"])
    with pytest.raises(ValueError):
        att.compute_attention(p, m, NAMES6, entropy="shannon")
    with pytest.raises(ValueError):
        att.compute_attention(p, m, ["liver"] * 6)
