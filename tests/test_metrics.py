"""Tests for semiseg.metrics: hand-computed values and a brute-force surface-distance oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest

from semiseg.metrics import (
    ALL_METRICS,
    DEFAULT_EMPTY_POLICY,
    DISTANCE_METRICS,
    OVERLAP_METRICS,
    SURFACE_METRICS,
    EmptyMaskPolicy,
    MetricAccumulator,
    binary_metrics,
    multiclass_metrics,
    summarize,
    volume_diagonal,
)


def brute_surface_coords(mask: np.ndarray) -> np.ndarray:
    """Indices of mask voxels with a face neighbour outside the mask or the array."""
    padded = np.pad(mask.astype(bool), 1, constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    surface = np.zeros(mask.shape, dtype=bool)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            neighbour = np.roll(padded, shift, axis=axis)[inner]
            surface |= mask & ~neighbour
    return np.argwhere(surface)


def brute_directed_distances(a, b, spacing):
    """All nearest-surface distances A->B and B->A from every pair of surface voxels."""
    sp = np.asarray(spacing, dtype=float)
    pa = brute_surface_coords(a) * sp
    pb = brute_surface_coords(b) * sp
    dists = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return dists.min(axis=1), dists.min(axis=0)


def brute_surface_distances(a, b, spacing):
    """(hd95, asd) from all pairwise distances between the two surfaces."""
    both = np.concatenate(brute_directed_distances(a, b, spacing))
    return float(np.percentile(both, 95)), float(both.mean())


def brute_nsd(a, b, spacing, tolerance):
    """Normalised surface Dice counted from the brute-force directed distances."""
    d_ab, d_ba = brute_directed_distances(a, b, spacing)
    return float(((d_ab <= tolerance).sum() + (d_ba <= tolerance).sum()) / (d_ab.size + d_ba.size))


def random_mask(rng: np.random.Generator, shape, p: float) -> np.ndarray:
    mask = rng.random(shape) < p
    if not mask.any():
        mask[tuple(s // 2 for s in shape)] = True
    return mask


def test_metric_name_constants():
    assert DISTANCE_METRICS == ("hd95", "asd")
    assert SURFACE_METRICS == ("hd95", "asd", "nsd")
    assert OVERLAP_METRICS == (
        "dice", "jaccard", "precision", "recall", "specificity", "accuracy",
    )
    assert ALL_METRICS == OVERLAP_METRICS + SURFACE_METRICS
    assert DEFAULT_EMPTY_POLICY.empty_distance == "nan"


def test_overlap_metrics_hand_computed():
    pred = np.array(
        [
            [1, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 1],
        ]
    )
    target = np.array(
        [
            [1, 0, 0, 0],
            [1, 1, 1, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 0],
        ]
    )
    # TP: (0,0),(1,0),(1,1)            = 3
    # FP: (0,1),(3,3)                  = 2
    # FN: (1,2)                        = 1
    # TN: 16 - 3 - 2 - 1               = 10
    res = binary_metrics(pred, target, (1.0, 1.0))
    assert res["dice"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # 6/9
    assert res["jaccard"] == pytest.approx(3 / (3 + 2 + 1))  # 3/6
    assert res["precision"] == pytest.approx(3 / 5)
    assert res["recall"] == pytest.approx(3 / 4)
    assert res["specificity"] == pytest.approx(10 / 12)
    assert res["accuracy"] == pytest.approx(13 / 16)
    assert set(res) == set(ALL_METRICS)


def test_overlap_metrics_bool_and_int_inputs_agree():
    rng = np.random.default_rng(3)
    a = random_mask(rng, (9, 7), 0.4)
    b = random_mask(rng, (9, 7), 0.4)
    r_bool = binary_metrics(a, b, (1.0, 2.0))
    r_int = binary_metrics(a.astype(np.uint8), b.astype(np.int64), (1.0, 2.0))
    for k in ALL_METRICS:
        assert r_bool[k] == pytest.approx(r_int[k])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("p", [0.15, 0.5])
def test_surface_distances_match_brute_force_2d(seed, p):
    rng = np.random.default_rng(seed)
    shape = (13, 11)
    spacing = (0.5, 3.0)
    a = random_mask(rng, shape, p)
    b = random_mask(rng, shape, p)
    hd95, asd = brute_surface_distances(a, b, spacing)
    res = binary_metrics(a, b, spacing)
    assert np.isclose(res["hd95"], hd95)
    assert np.isclose(res["asd"], asd)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("p", [0.1, 0.4])
def test_surface_distances_match_brute_force_3d(seed, p):
    rng = np.random.default_rng(100 + seed)
    shape = (8, 7, 6)
    spacing = (0.5, 1.0, 3.0)
    a = random_mask(rng, shape, p)
    b = random_mask(rng, shape, p)
    hd95, asd = brute_surface_distances(a, b, spacing)
    res = binary_metrics(a, b, spacing)
    assert np.isclose(res["hd95"], hd95)
    assert np.isclose(res["asd"], asd)


def test_surface_distances_brute_force_interior_blobs_3d():
    # Compact blobs away from the border, so surfaces are strict subsets of the masks
    # and the bounding-box crop in the implementation is exercised.
    zz, yy, xx = np.meshgrid(np.arange(20), np.arange(18), np.arange(16), indexing="ij")
    a = (zz - 9) ** 2 / 16 + (yy - 8) ** 2 / 9 + (xx - 7) ** 2 / 12 <= 1
    b = (zz - 11) ** 2 / 9 + (yy - 9) ** 2 / 16 + (xx - 8) ** 2 / 6 <= 1
    spacing = (0.5, 1.0, 3.0)
    hd95, asd = brute_surface_distances(a, b, spacing)
    res = binary_metrics(a, b, spacing)
    assert hd95 > 0 and asd > 0
    assert np.isclose(res["hd95"], hd95)
    assert np.isclose(res["asd"], asd)


def test_hd95_is_percentile_of_union_not_max_of_directed():
    # A is one voxel; B is a long line. Directed B->A distances are large for most of B,
    # A->B is a single small distance; union-percentile vs max-of-directed differ.
    a = np.zeros((1, 40), dtype=bool)
    b = np.zeros((1, 40), dtype=bool)
    a[0, 0] = True
    b[0, :] = True
    b[0, 0] = False
    # B's surface is all of B (1 row tall): columns 1..39; A's surface is column 0.
    # d(A->B) = [1]; d(B->A) = [1..39]; union = [1, 1, 2, ..., 39] (40 values).
    union = np.concatenate([[1.0], np.arange(1, 40, dtype=float)])
    res = binary_metrics(a, b, (1.0, 1.0))
    assert res["hd95"] == pytest.approx(np.percentile(union, 95))
    assert res["hd95"] != pytest.approx(np.percentile(np.arange(1, 40), 95))
    assert res["asd"] == pytest.approx(union.mean())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tolerance", [0.0, 1.0, 3.0, 4.5])
def test_nsd_matches_brute_force_3d(seed, tolerance):
    rng = np.random.default_rng(200 + seed)
    shape = (8, 7, 6)
    spacing = (0.5, 1.0, 3.0)
    a = random_mask(rng, shape, 0.2)
    b = random_mask(rng, shape, 0.2)
    expected = brute_nsd(a, b, spacing, tolerance)
    res = binary_metrics(a, b, spacing, nsd_tolerance_mm=tolerance)
    assert res["nsd"] == pytest.approx(expected)


def test_nsd_hand_computed_line_and_point():
    # A: one voxel at column 0 (surface {0}); B: columns 1..9 (surface = all of B, one row).
    # d(A->B) = [1]; d(B->A) = [1, 2, ..., 9] (spacing 1). Tolerance 2.5: 1 + 2 within -> 3 of 10.
    a = np.zeros((1, 10), dtype=bool)
    b = np.zeros((1, 10), dtype=bool)
    a[0, 0] = True
    b[0, 1:] = True
    assert binary_metrics(a, b, (1.0, 1.0), nsd_tolerance_mm=2.5)["nsd"] == pytest.approx(3 / 10)
    # Spacing 2 along the row doubles the distances: only the distance-2 pair is within 2.5.
    assert binary_metrics(a, b, (1.0, 2.0), nsd_tolerance_mm=2.5)["nsd"] == pytest.approx(2 / 10)
    assert binary_metrics(a, b, (1.0, 1.0), nsd_tolerance_mm=100.0)["nsd"] == 1.0


def test_nsd_empty_masks():
    empty = np.zeros((4, 5), dtype=bool)
    one = empty.copy()
    one[2, 2] = True
    assert binary_metrics(empty, empty, (1.0, 1.0))["nsd"] == 1.0
    assert binary_metrics(one, empty, (1.0, 1.0))["nsd"] == 0.0
    assert binary_metrics(empty, one, (1.0, 1.0), nsd_tolerance_mm=1e6)["nsd"] == 0.0
    policy = EmptyMaskPolicy(both_empty_overlap=0.25)
    assert binary_metrics(empty, empty, (1.0, 1.0), empty_policy=policy)["nsd"] == 0.25


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_nsd_rejects_bad_tolerance(bad):
    a = np.ones((3, 3), dtype=bool)
    with pytest.raises(ValueError, match="nsd_tolerance_mm must be finite and >= 0"):
        binary_metrics(a, a, (1.0, 1.0), nsd_tolerance_mm=bad)
    with pytest.raises(ValueError, match="nsd_tolerance_mm must be finite and >= 0"):
        multiclass_metrics(a.astype(int), a.astype(int), (1.0, 1.0), [1], nsd_tolerance_mm=bad)


def test_single_voxels_three_apart_with_spacing_two():
    a = np.zeros((7, 5), dtype=bool)
    b = np.zeros((7, 5), dtype=bool)
    a[1, 2] = True
    b[4, 2] = True
    res = binary_metrics(a, b, (2.0, 2.0))
    assert res["hd95"] == pytest.approx(6.0)
    assert res["asd"] == pytest.approx(6.0)
    assert res["dice"] == 0.0


def test_anisotropic_spacing_uses_the_right_axis():
    a = np.zeros((5, 5, 5), dtype=bool)
    b = np.zeros((5, 5, 5), dtype=bool)
    a[1, 2, 2] = True
    b[1, 2, 4] = True  # 2 voxels apart along axis 2
    res = binary_metrics(a, b, (0.5, 1.0, 3.0))
    assert res["hd95"] == pytest.approx(6.0)
    assert res["asd"] == pytest.approx(6.0)


def test_doubling_spacing_doubles_surface_distances():
    rng = np.random.default_rng(7)
    a = random_mask(rng, (10, 9, 8), 0.3)
    b = random_mask(rng, (10, 9, 8), 0.3)
    spacing = np.array([0.5, 1.0, 3.0])
    r1 = binary_metrics(a, b, tuple(spacing))
    r2 = binary_metrics(a, b, tuple(2 * spacing))
    assert r1["hd95"] > 0
    assert r2["hd95"] == pytest.approx(2 * r1["hd95"])
    assert r2["asd"] == pytest.approx(2 * r1["asd"])
    for k in OVERLAP_METRICS:
        assert r2[k] == pytest.approx(r1[k])


def test_identical_masks_have_zero_distance():
    rng = np.random.default_rng(11)
    a = random_mask(rng, (6, 6, 6), 0.3)
    res = binary_metrics(a, a.copy(), (0.5, 1.0, 3.0))
    assert res["dice"] == 1.0
    assert res["hd95"] == 0.0
    assert res["asd"] == 0.0


def test_both_empty_is_perfect_agreement():
    empty = np.zeros((4, 5, 6), dtype=bool)
    res = binary_metrics(empty, empty, (1.0, 1.0, 2.0))
    for k in ("dice", "jaccard", "precision", "recall", "specificity", "accuracy", "nsd"):
        assert res[k] == 1.0, k
    assert res["hd95"] == 0.0
    assert res["asd"] == 0.0


def test_target_empty_pred_nonempty_default_policy():
    pred = np.zeros((4, 5), dtype=bool)
    pred[1, 1:3] = True  # 2 FP, TN = 18
    target = np.zeros((4, 5), dtype=bool)
    res = binary_metrics(pred, target, (1.0, 1.0))
    assert res["dice"] == 0.0
    assert res["jaccard"] == 0.0
    assert res["precision"] == 0.0  # 0 / (0 + 2)
    assert math.isnan(res["recall"])  # 0 / 0
    assert res["specificity"] == pytest.approx(18 / 20)
    assert res["accuracy"] == pytest.approx(18 / 20)
    assert math.isnan(res["hd95"]) and res["hd95"] != 0
    assert math.isnan(res["asd"])


def test_pred_empty_target_nonempty_default_policy():
    pred = np.zeros((4, 5), dtype=bool)
    target = np.zeros((4, 5), dtype=bool)
    target[2, 2] = True  # 1 FN, TN = 19
    res = binary_metrics(pred, target, (1.0, 1.0))
    assert res["dice"] == 0.0
    assert math.isnan(res["precision"])  # 0 / 0
    assert res["recall"] == 0.0  # 0 / (0 + 1)
    assert res["specificity"] == 1.0
    assert res["accuracy"] == pytest.approx(19 / 20)
    assert math.isnan(res["hd95"])
    assert math.isnan(res["asd"])


def test_one_empty_max_policy_gives_volume_diagonal():
    shape = (4, 5, 6)
    spacing = (0.5, 1.0, 3.0)
    pred = np.zeros(shape, dtype=bool)
    pred[0, 0, 0] = True
    target = np.zeros(shape, dtype=bool)
    policy = EmptyMaskPolicy(empty_distance="max")
    diagonal = math.sqrt((4 * 0.5) ** 2 + (5 * 1.0) ** 2 + (6 * 3.0) ** 2)
    assert volume_diagonal(shape, spacing) == pytest.approx(diagonal)
    for p, t in ((pred, target), (target, pred)):
        res = binary_metrics(p, t, spacing, empty_policy=policy)
        assert res["hd95"] == pytest.approx(diagonal)
        assert res["asd"] == pytest.approx(diagonal)
        assert res["dice"] == 0.0
    both_empty = binary_metrics(target, target, spacing, empty_policy=policy)
    assert both_empty["hd95"] == 0.0


def test_policy_rejects_unknown_empty_distance():
    with pytest.raises(ValueError, match="empty_distance"):
        EmptyMaskPolicy(empty_distance="zero")


def test_shape_mismatch_raises_with_both_shapes():
    a = np.zeros((3, 4), dtype=bool)
    b = np.zeros((4, 3), dtype=bool)
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        binary_metrics(a, b, (1.0, 1.0))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(4, 3\)"):
        multiclass_metrics(a.astype(int), b.astype(int), (1.0, 1.0), [1])


def test_spacing_wrong_length_raises():
    a = np.zeros((3, 4, 5), dtype=bool)
    with pytest.raises(ValueError, match=r"spacing has length 2 .*ndim 3"):
        binary_metrics(a, a, (1.0, 1.0))


@pytest.mark.parametrize("bad", [(1.0, 0.0), (1.0, -2.0), (float("nan"), 1.0)])
def test_spacing_nonpositive_raises(bad):
    a = np.zeros((3, 4), dtype=bool)
    with pytest.raises(ValueError, match=r"spacing values must be finite and > 0"):
        binary_metrics(a, a, bad)


def test_non_binary_mask_raises():
    a = np.zeros((3, 4), dtype=np.int64)
    b = a.copy()
    b[0, 0] = 2
    with pytest.raises(ValueError, match=r"target must be boolean or contain only 0/1"):
        binary_metrics(a, b, (1.0, 1.0))


def test_multiclass_two_classes():
    target = np.zeros((6, 8), dtype=np.int64)
    pred = np.zeros((6, 8), dtype=np.int64)
    target[1, 1:3] = 1  # class 1: 2 voxels
    pred[1, 1:4] = 1  # class 1: 3 voxels, TP=2 FP=1 FN=0 -> dice 4/5
    target[4, 5] = 2  # class 2: single voxels 2 apart along axis 1
    pred[4, 7] = 2  # TP=0 -> dice 0
    spacing = (1.0, 1.5)
    res = multiclass_metrics(pred, target, spacing, class_ids=[1, 2])

    for c in (1, 2):
        ref = binary_metrics(pred == c, target == c, spacing)
        for m in ALL_METRICS:
            assert np.isclose(res[f"{m}/{c}"], ref[m], equal_nan=True), (m, c)
    assert res["dice/1"] == pytest.approx(4 / 5)
    assert res["dice/2"] == 0.0
    assert res["hd95/2"] == pytest.approx(3.0)
    assert res["dice"] == pytest.approx((4 / 5 + 0.0) / 2)
    assert res["hd95"] == pytest.approx((res["hd95/1"] + 3.0) / 2)
    assert set(res) == set(ALL_METRICS) | {f"{m}/{c}" for m in ALL_METRICS for c in (1, 2)}


def test_multiclass_missed_class_makes_distance_mean_nan_but_counts_in_dice():
    target = np.zeros((5, 5), dtype=np.int64)
    pred = np.zeros((5, 5), dtype=np.int64)
    target[1:3, 1:3] = 1
    pred[1:3, 1:3] = 1  # class 1 perfect
    target[4, 4] = 2  # class 2 missed entirely -> hd95 NaN under default policy
    res = multiclass_metrics(pred, target, (1.0, 1.0), class_ids=[1, 2])
    assert math.isnan(res["hd95/2"]) and math.isnan(res["asd/2"])
    assert res["hd95/1"] == 0.0
    assert math.isnan(res["hd95"])  # the miss is not dropped from the case's mean
    assert math.isnan(res["asd"])
    assert res["dice/2"] == 0.0
    assert res["dice"] == pytest.approx(0.5)  # (1 + 0) / 2: the miss counts
    assert res["nsd/2"] == 0.0
    assert res["nsd"] == pytest.approx(0.5)
    assert math.isnan(res["precision/2"])  # nothing predicted: 0 / 0
    assert res["precision"] == 1.0  # NaN entries of non-distance metrics are ignored
    assert res["recall"] == pytest.approx(0.5)

    res3 = multiclass_metrics(pred, target, (1.0, 1.0), class_ids=[2])
    assert math.isnan(res3["hd95"])  # all classes NaN -> NaN


def test_multiclass_false_positive_class_makes_distance_mean_nan():
    target = np.zeros((6, 6), dtype=np.int64)
    pred = np.zeros((6, 6), dtype=np.int64)
    target[0:2, 0:2] = 1
    pred[0:2, 0:2] = 1
    pred[5, 5] = 2  # class 2 predicted, absent from the reference
    res = multiclass_metrics(pred, target, (1.0, 2.0), class_ids=[1, 2])
    assert res["dice/2"] == 0.0
    assert math.isnan(res["recall/2"])
    assert math.isnan(res["hd95"])
    assert res["dice"] == pytest.approx(0.5)


def test_multiclass_max_policy_keeps_the_penalty_in_the_mean():
    target = np.zeros((4, 5), dtype=np.int64)
    pred = np.zeros((4, 5), dtype=np.int64)
    target[0:2, 0:2] = 1
    pred[0:2, 0:2] = 1
    target[3, 4] = 2
    policy = EmptyMaskPolicy(empty_distance="max")
    res = multiclass_metrics(pred, target, (1.0, 2.0), class_ids=[1, 2], empty_policy=policy)
    diagonal = math.sqrt(4.0 ** 2 + 10.0 ** 2)
    assert res["hd95/2"] == pytest.approx(diagonal)
    assert res["hd95"] == pytest.approx(diagonal / 2)


def test_multiclass_class_absent_from_both_is_nan_and_left_out():
    target = np.zeros((6, 6, 4), dtype=np.int64)
    pred = np.zeros((6, 6, 4), dtype=np.int64)
    target[1:3, 1:3, 1] = 1
    pred[1:3, 1:2, 1] = 1  # class 1: TP 2, FN 2 -> dice 4/6
    target[4, 4, 2] = 3
    pred[4, 4, 2] = 3  # class 3 perfect; class 2 absent from both
    res = multiclass_metrics(pred, target, (1.0, 1.0, 3.0), class_ids=[1, 2, 3])
    for m in ALL_METRICS:
        assert math.isnan(res[f"{m}/2"]), m
    assert res["dice/1"] == pytest.approx(4 / 6)
    assert res["dice/3"] == 1.0
    assert res["dice"] == pytest.approx((4 / 6 + 1.0) / 2)  # not (4/6 + 1 + 1) / 3
    assert res["hd95"] == pytest.approx((res["hd95/1"] + 0.0) / 2)
    assert res["nsd"] == pytest.approx((res["nsd/1"] + 1.0) / 2)
    # binary_metrics keeps its both-empty policy
    assert binary_metrics(pred == 2, target == 2, (1.0, 1.0, 3.0))["dice"] == 1.0


def test_multiclass_every_class_absent_gives_nan_means():
    empty = np.zeros((4, 4, 2), dtype=np.int64)
    res = multiclass_metrics(empty, empty.copy(), (1.0, 1.0, 2.0), class_ids=[1, 2, 3])
    for m in ALL_METRICS:
        assert math.isnan(res[m]), m
        assert math.isnan(res[f"{m}/1"]), m


def test_multiclass_passes_nsd_tolerance_through():
    target = np.zeros((1, 8), dtype=np.int64)
    pred = np.zeros((1, 8), dtype=np.int64)
    target[0, 2] = 1
    pred[0, 4] = 1  # 2 voxels apart along an axis of spacing 1.5 -> 3 mm
    strict = multiclass_metrics(pred, target, (1.0, 1.5), class_ids=[1], nsd_tolerance_mm=2.9)
    loose = multiclass_metrics(pred, target, (1.0, 1.5), class_ids=[1], nsd_tolerance_mm=3.0)
    assert strict["nsd/1"] == 0.0 and strict["nsd"] == 0.0
    assert loose["nsd/1"] == 1.0 and loose["nsd"] == 1.0


def test_multiclass_rejects_bad_class_ids():
    a = np.zeros((3, 3), dtype=int)
    with pytest.raises(ValueError, match="at least one"):
        multiclass_metrics(a, a, (1.0, 1.0), class_ids=[])
    with pytest.raises(ValueError, match="duplicates"):
        multiclass_metrics(a, a, (1.0, 1.0), class_ids=[1, 1])


def test_summarize_ignores_nan_and_counts_it():
    cases = [
        {"dice": 0.5, "hd95": 2.0},
        {"dice": 1.0, "hd95": float("nan")},
        {"dice": 0.0, "hd95": 4.0},
    ]
    s = summarize(cases)
    assert s["n_cases"] == 3
    assert s["dice"] == pytest.approx(0.5)
    # sample std (ddof 1): deviations -0.5, 0.5, 0 -> sqrt(0.5 / 2) = 0.5
    assert s["dice_std"] == pytest.approx(0.5)
    assert s["dice_std"] == pytest.approx(np.std([0.5, 1.0, 0.0], ddof=1))
    assert s["dice_nan_cases"] == 0
    assert s["hd95"] == pytest.approx(3.0)
    # two values 2 and 4: sqrt(((-1)^2 + 1^2) / 1) = sqrt(2)
    assert s["hd95_std"] == pytest.approx(math.sqrt(2.0))
    assert s["hd95_nan_cases"] == 1


def test_summarize_std_of_one_value_is_nan():
    s = summarize([{"dice": 0.7, "hd95": 3.0}, {"dice": float("nan"), "hd95": 5.0}])
    assert s["dice"] == pytest.approx(0.7)
    assert math.isnan(s["dice_std"])
    assert s["dice_nan_cases"] == 1
    assert s["hd95_std"] == pytest.approx(math.sqrt(2.0))


def test_summarize_all_nan_metric():
    s = summarize([{"asd": float("nan")}, {"asd": float("nan")}])
    assert math.isnan(s["asd"])
    assert math.isnan(s["asd_std"])
    assert s["asd_nan_cases"] == 2


def test_accumulator_matches_summarize():
    rng = np.random.default_rng(5)
    acc = MetricAccumulator()
    cases = []
    for _ in range(3):
        a = random_mask(rng, (6, 7), 0.3)
        b = random_mask(rng, (6, 7), 0.3)
        r = binary_metrics(a, b, (1.0, 0.5))
        cases.append(r)
        acc.add(r)
    acc.add(binary_metrics(np.ones((6, 7), bool), np.zeros((6, 7), bool), (1.0, 0.5)))
    assert len(acc) == 4
    s = acc.summary()
    assert s["hd95_nan_cases"] == 1
    assert s["hd95"] == pytest.approx(np.mean([c["hd95"] for c in cases]))
    assert s["dice"] == pytest.approx(np.mean([c["dice"] for c in cases] + [0.0]))
