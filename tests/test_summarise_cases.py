"""Tests for semiseg.train.evaluate.summarise_cases: means over cases, per class, with NaN counted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from semiseg.data.prepared import EvalCase
from semiseg.metrics import ALL_METRICS, multiclass_metrics
from semiseg.train.evaluate import class_metric_names, evaluate_cases, metric_safe_name, summarise_cases

NAN = math.nan
LABELS = {0: "background", 1: "liver", 2: "spleen", 3: "tumour"}


def case(case_id: str, dice: dict[int, float], hd95: dict[int, float]) -> dict:
    """A per-case dict as evaluate_cases returns it, with the over-class means of multiclass_metrics."""
    out: dict = {"case_id": case_id}
    present_dice = [v for v in dice.values() if not math.isnan(v)]
    out["dice"] = sum(present_dice) / len(present_dice)
    present = [c for c in dice if not math.isnan(dice[c])]
    distances = [hd95[c] for c in present]
    out["hd95"] = NAN if any(math.isnan(v) for v in distances) else sum(distances) / len(distances)
    for c in (1, 2, 3):
        out[f"dice/{c}"] = dice[c]
        out[f"hd95/{c}"] = hd95[c]
    return out


# Case a: tumour (3) absent from prediction and reference -> all its metrics NaN.
# Case b: spleen (2) missed entirely -> dice 0, hd95 NaN, so the case's hd95 mean is NaN.
# Case c: everything present.
CASES = [
    case("a", {1: 0.8, 2: 0.6, 3: NAN}, {1: 2.0, 2: 4.0, 3: NAN}),
    case("b", {1: 0.9, 2: 0.0, 3: 0.5}, {1: 1.0, 2: NAN, 3: 6.0}),
    case("c", {1: 1.0, 2: 0.7, 3: 0.8}, {1: 0.0, 2: 3.0, 3: 3.0}),
]


def test_hand_built_case_means_are_what_the_table_says():
    assert CASES[0]["dice"] == pytest.approx(0.7)
    assert CASES[1]["dice"] == pytest.approx(1.4 / 3)
    assert math.isnan(CASES[1]["hd95"])
    assert CASES[2]["hd95"] == pytest.approx(2.0)


def test_means_over_cases_and_per_class():
    out = summarise_cases(CASES, "test", LABELS)
    # over-class means per case: 0.7, 1.4/3, 2.5/3 -> mean 2/3
    assert out["test/dice"] == pytest.approx(2.0 / 3.0)
    # hd95 case means: 3.0, NaN, 2.0
    assert out["test/hd95"] == pytest.approx(2.5)
    assert out["test/hd95_nan_cases"] == 1.0
    assert out["test/dice/liver"] == pytest.approx(0.9)
    assert out["test/dice/spleen"] == pytest.approx(1.3 / 3)  # the miss (0.0) counts
    assert out["test/dice/tumour"] == pytest.approx(0.65)  # the absent case is left out
    assert out["test/dice/tumour_nan_cases"] == 1.0
    assert out["test/hd95/liver"] == pytest.approx(1.0)
    assert out["test/hd95/liver_nan_cases"] == 0.0
    assert out["test/hd95/spleen"] == pytest.approx(3.5)
    assert out["test/hd95/spleen_nan_cases"] == 1.0
    assert out["test/hd95/tumour"] == pytest.approx(4.5)
    assert out["test/hd95/tumour_nan_cases"] == 1.0


def test_exact_key_set_nan_counts_only_where_needed():
    out = summarise_cases(CASES, "val", LABELS)
    expected = {
        "val/dice", "val/hd95", "val/hd95_nan_cases",
        "val/dice/liver", "val/dice/spleen", "val/dice/tumour", "val/dice/tumour_nan_cases",
        "val/hd95/liver", "val/hd95/spleen", "val/hd95/tumour",
        "val/hd95/liver_nan_cases", "val/hd95/spleen_nan_cases", "val/hd95/tumour_nan_cases",
    }
    assert set(out) == expected
    assert all(isinstance(v, float) for v in out.values())


def test_without_label_names_classes_are_named_by_id():
    out = summarise_cases(CASES, "test")
    assert out["test/dice/1"] == pytest.approx(0.9)
    assert out["test/hd95/2_nan_cases"] == 1.0
    partial = summarise_cases(CASES, "test", {0: "background", 1: "liver"})
    assert partial["test/dice/liver"] == pytest.approx(0.9)
    assert partial["test/dice/3"] == pytest.approx(0.65)


def test_label_names_are_made_mlflow_safe_and_unique():
    assert metric_safe_name("left kidney (L)/main") == "left kidney _L__main"
    assert metric_safe_name("ok_name-1.2 x") == "ok_name-1.2 x"
    names = class_metric_names(["1", "2", "3"], {1: "a/b", 2: "a_b", 3: "Ödem"})
    assert names == {"1": "a_b_1", "2": "a_b_2", "3": "_dem"}
    out = summarise_cases(CASES, "test", {1: "left kidney (L)", 2: "spleen", 3: "tumour"})
    assert out["test/dice/left kidney _L_"] == pytest.approx(0.9)


def test_no_cases_gives_nothing():
    assert summarise_cases([], "val", LABELS) == {}


def test_string_keyed_label_names_from_json():
    out = summarise_cases(CASES, "test", {"1": "liver", "2": "spleen", "3": "tumour"})
    assert out["test/dice/spleen"] == pytest.approx(1.3 / 3)


def test_real_multiclass_metrics_summarised():
    spacing = (1.0, 1.0, 3.0)
    target = np.zeros((6, 6, 4), dtype=np.int64)
    target[1:3, 1:3, 1] = 1
    target[4, 4, 2] = 2
    pred = target.copy()
    pred[4, 4, 2] = 0  # class 2 missed; class 3 absent from both
    per_case = [
        {"case_id": "x", **multiclass_metrics(pred, target, spacing, [1, 2, 3])},
        {"case_id": "y", **multiclass_metrics(target, target, spacing, [1, 2, 3])},
    ]
    out = summarise_cases(per_case, "test", LABELS)
    assert out["test/dice"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["test/hd95"] == 0.0
    assert out["test/hd95_nan_cases"] == 1.0
    assert out["test/dice/spleen"] == pytest.approx(0.5)
    assert math.isnan(out["test/dice/tumour"])
    assert out["test/dice/tumour_nan_cases"] == 2.0
    assert out["test/nsd/liver"] == 1.0
    assert {f"test/{m}" for m in ALL_METRICS} <= set(out)


class FixedLogits(nn.Module):
    """Predicts class 1 on one voxel of a 1 x 1 x 5 volume, background elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros((x.shape[0], 2, *x.shape[2:]))
        logits[:, 0] = 1.0
        logits[:, 1, 0, 0, 3] = 2.0
        return logits


def test_evaluate_cases_passes_the_nsd_tolerance():
    label = np.zeros((1, 1, 5), dtype=np.int64)
    label[0, 0, 1] = 1  # prediction at z=3: 2 voxels x 3 mm = 6 mm away
    cases = [EvalCase("c", np.zeros((1, 1, 1, 5), dtype=np.float32), label, (1.0, 1.0, 3.0))]
    strict = evaluate_cases(FixedLogits(), cases, [0, 1], dims=3, batch_size=1, nsd_tolerance_mm=5.9)
    loose = evaluate_cases(FixedLogits(), cases, [0, 1], dims=3, batch_size=1, nsd_tolerance_mm=6.0)
    default = evaluate_cases(FixedLogits(), cases, [0, 1], dims=3, batch_size=1)
    assert strict[0]["hd95/1"] == pytest.approx(6.0)
    assert strict[0]["nsd/1"] == 0.0
    assert loose[0]["nsd/1"] == 1.0
    assert default[0]["nsd/1"] == 0.0
