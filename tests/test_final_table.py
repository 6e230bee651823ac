"""The study's closing report: sample std, per-class and post-processed tables, the paired verdict
by split and seed in the console and results.json, and range-edge warnings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from semiseg.tune import Study
from semiseg.tune.report import report, summarise
from semiseg.tune.results import (TrialRow, final_comparisons, final_table, format_per_class_table, mean_std,
                                  per_class_table, postprocessed_table)
from semiseg.tune.space import method_space

LABELS = ("liver", "tumour", "vessel")


def row(method: str, split: int | None, seed: int, dice: float, *, hd95: float = 10.0, per_class: bool = False,
        postprocessed: bool = False, phase: str = "final", params: dict | None = None, val: float = 0.5) -> TrialRow:
    metrics = {"test/dice": dice, "test/jaccard": dice / (2 - dice), "test/hd95": hd95, "test/asd": 2.0,
               "test/precision": dice, "test/recall": dice, "val/dice": val}
    if per_class:
        for index, label in enumerate(LABELS):
            metrics[f"test/dice/{label}"] = dice - 0.1 * index
            metrics[f"test/hd95/{label}"] = hd95 + index
            metrics[f"test/dice/{label}_nan_cases"] = 0.0
    if postprocessed:
        metrics["test_postprocessed/dice"] = dice + 0.01
        metrics["test_postprocessed/hd95"] = hd95 - 3.0
    config = {"method.name": method, "train.seed": seed}
    if split is not None:
        config["data.split"] = split
    return TrialRow(trial_id=f"{method}-{split}-{seed}", phase=phase, method=method, params=dict(params or {}),
                    epochs=10, best_val_dice=val, best_epoch=10, test_dice=dice, status="completed",
                    metrics=metrics, config=config)


def two_splits_two_seeds(**options) -> list[TrialRow]:
    """mean_teacher ahead by 0.02 except on (split 1, seed 2), where it is behind by 0.04."""
    rows = []
    for split in (0, 1):
        for seed in (1, 2):
            base = 0.6 + 0.1 * split + 0.01 * seed
            rows.append(row("supervised", split, seed, base, hd95=12.0, **options))
            rows.append(row("mean_teacher", split, seed, base + (-0.04 if (split, seed) == (1, 2) else 0.02),
                            hd95=14.0, **options))
    return rows


class NoTracker:
    """A study without a parent run never logs to MLflow."""

    def log_metrics(self, *args, **kwargs):  # pragma: no cover - must not be called
        raise AssertionError("no parent run, no MLflow logging")

    log_json = log_metrics


def test_mean_std_and_final_table_use_the_sample_std():
    mean, std = mean_std([0.5, 0.7, float("nan")])
    assert mean == pytest.approx(0.6) and std == pytest.approx(math.sqrt(0.02))
    assert math.isnan(mean_std([0.5])[1])
    table = final_table([row("m", 0, s, d) for s, d in enumerate([0.6, 0.7, 0.8])], ("dice",))
    assert table["m"]["dice"] == (pytest.approx(0.7), pytest.approx(0.1), 3), "ddof 1: sqrt(0.02 / 2)"


def test_comparisons_pair_by_split_and_seed():
    rows = two_splits_two_seeds()
    [comparison] = final_comparisons(rows, final_table(rows))
    assert (comparison.method, comparison.reference) == ("mean_teacher", "supervised")
    assert [(p.split, p.seed) for p in comparison.pairs] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert [p.value - p.reference_value for p in comparison.pairs] == pytest.approx([0.02, 0.02, 0.02, -0.04])
    assert comparison.test.n == 4 and comparison.test.mean_difference == pytest.approx(0.005)
    assert [w.metric for w in comparison.worse_on] == ["hd95"]
    seed_only = [r for r in rows if r.config["data.split"] == 0]
    for r in seed_only:
        del r.config["data.split"]
    [paired] = final_comparisons(seed_only, final_table(seed_only))
    assert [(p.split, p.seed) for p in paired.pairs] == [(0, 1), (0, 2)], "no data.split: split 0"


def test_per_class_table_has_a_column_per_label_and_needs_two_labels():
    rows = two_splits_two_seeds(per_class=True)
    table = per_class_table(rows)
    assert set(table["mean_teacher"]) == {f"{m}/{label}" for label in LABELS for m in ("dice", "hd95")}
    text = format_per_class_table(table)
    header = text.splitlines()[0].split()
    assert header == ["method", "n", *LABELS]
    mean, std, count = table["supervised"]["dice/tumour"]
    assert count == 4 and mean == pytest.approx(0.665 - 0.1)
    assert f"{mean:.4f} ({std:.4f}) / 13.00 (0.00)" in text
    assert "nan_cases" not in text
    single = [TrialRow(**{**r.__dict__, "metrics": {k: v for k, v in r.metrics.items()
                                                    if "/tumour" not in k and "/vessel" not in k}}) for r in rows]
    assert per_class_table(single) == {}, "one foreground label: the main table already is its table"


def test_postprocessed_table_puts_raw_and_pp_side_by_side():
    assert postprocessed_table(two_splits_two_seeds()) == {}
    table = postprocessed_table(two_splits_two_seeds(postprocessed=True))
    assert list(table["supervised"]) == ["dice", "dice (pp)", "hd95", "hd95 (pp)"]
    assert table["supervised"]["hd95 (pp)"][0] == pytest.approx(9.0)
    assert table["supervised"]["dice (pp)"][0] == pytest.approx(table["supervised"]["dice"][0] + 0.01)


def test_report_prints_the_verdict_tables_and_edge_warnings_and_results_json_agrees(tmp_path: Path, capsys):
    study = Study(name="s", description="", methods={"mean_teacher": ["ema_decay"]},
                  ranges={"ema_decay": (0.9, 0.995)})
    searched = [row("mean_teacher", None, 0, float("nan"), phase="search-mean_teacher", val=v,
                    params={"method.ema_decay": decay})
                for v, decay in ((0.7, 0.9135), (0.6, 0.97), (0.5, 0.99))]
    rows = searched + two_splits_two_seeds(per_class=True, postprocessed=True)
    spaces = {"search-mean_teacher": method_space("mean_teacher", ["ema_decay"], {"ema_decay": (0.9, 0.995)})}
    outcome = summarise(study, "sqlite:////x/mlflow.db", None, rows, spaces=spaces)
    report(outcome, NoTracker(), None, tmp_path)
    out = capsys.readouterr().out
    assert "mean (std) over splits × seeds of the test metrics" in out
    assert "per class: mean (std) over splits × seeds of test Dice / HD95" in out
    assert all(label in out for label in LABELS)
    assert "dice (pp)" in out and "hd95 (pp)" in out
    assert "ema_decay = 0.9135 lies at the lower edge of the searched range 0.9–0.995; widen it, e.g. " \
           "--range ema_decay=0.45:0.995" in out
    assert out.index("best searched trial") < out.index("lies at the lower edge") < out.index("== final phase")
    assert "beats" not in out
    [line] = [line for line in out.splitlines() if line.startswith("== mean_teacher vs supervised")]
    assert "paired t-test over 4 paired runs (split × seed)" in line
    assert ": no evidence of a difference; but mean_teacher is worse on hd95 (14.00 vs 12.00 mm)" in line
    payload = json.loads((tmp_path / "results.json").read_text())
    [record] = payload["comparisons"]
    assert line == f"== {record['verdict']}"
    assert record["pairs"] == [[0, 1, pytest.approx(0.63), pytest.approx(0.61)],
                               [0, 2, pytest.approx(0.64), pytest.approx(0.62)],
                               [1, 1, pytest.approx(0.73), pytest.approx(0.71)],
                               [1, 2, pytest.approx(0.68), pytest.approx(0.72)]]
    assert record["conclusion"] == "no evidence of a difference" and record["n_pairs"] == 4
    assert record["ci_low"] < 0 < record["ci_high"]
    assert record["worse_on"] == [{"metric": "hd95", "winner_mean": 14.0, "other_mean": 12.0}]
    assert payload["summary"]["final/mean_teacher/dice_difference"] == pytest.approx(record["mean_difference"])
    assert payload["summary"]["final/mean_teacher/dice_difference_ci_low"] == pytest.approx(record["ci_low"])
    assert payload["final_splits"] == 2
    [warning] = payload["range_warnings"]
    assert warning["phase"] == "search-mean_teacher" and warning["range_option"] == "--range ema_decay=0.45:0.995"
    assert payload["final"]["supervised"]["dice"][1] == pytest.approx(
        math.sqrt(sum((v - 0.665) ** 2 for v in (0.61, 0.62, 0.71, 0.72)) / 3)), "ddof 1 in results.json"


def test_one_split_says_over_seeds_and_no_spaces_means_no_warnings(tmp_path: Path, capsys):
    study = Study(name="s", description="")
    rows = [r for r in two_splits_two_seeds() if r.config["data.split"] == 0]
    outcome = summarise(study, "sqlite:////x/mlflow.db", None, rows)
    report(outcome, NoTracker(), None, tmp_path)
    out = capsys.readouterr().out
    assert "mean (std) over seeds of the test metrics" in out and "splits" not in out
    assert "per class" not in out and "(pp)" not in out and "edge of a searched range" not in out
    assert json.loads((tmp_path / "results.json").read_text())["range_warnings"] == []


def test_the_per_split_table_shows_each_splits_mean_over_its_seeds():
    from semiseg.tune.results import per_split_table

    def row(method, split, seed, dice):
        return TrialRow(f"{method}{split}{seed}", "final", method, {}, 2, 0.5, 2, dice, "completed",
                        metrics={"test/dice": dice}, config={"data.split": split, "train.seed": seed})

    rows = [row("mean_teacher", 0, 1, 0.6), row("mean_teacher", 0, 2, 0.8), row("mean_teacher", 1, 1, 0.4),
            row("mean_teacher", 1, 2, 0.5), row("supervised", 0, 1, 0.7), row("supervised", 1, 1, 0.3)]
    table = per_split_table(rows)
    assert table["mean_teacher"]["split 0"][0] == pytest.approx(0.7)
    assert table["mean_teacher"]["split 0"][1] == pytest.approx(0.1414213, abs=1e-6)
    assert table["mean_teacher"]["split 1"][:1] == pytest.approx((0.45,))
    assert table["supervised"]["split 1"][2] == 1
    assert per_split_table([r for r in rows if r.config["data.split"] == 0]) == {}
