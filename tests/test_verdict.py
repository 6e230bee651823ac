"""The honest verdict: a paired comparison with its 95 % interval, the test and p-value, and the
metrics on which the side with the higher mean Dice is worse; the same sentence in the HTML report."""

from __future__ import annotations

import math

import pytest

from semiseg.report.build import build_study_view
from semiseg.report.html import render_page
from semiseg.report.search import OptunaSearch, SearchedParam, SearchInfo
from semiseg.report.stats import NO_EVIDENCE, TEST_PAIRED_T, Pair, compare, method_rows, paired_test, verdict
from semiseg.report.store import ParentRun, StudyRecord, TrialRun

T_0975_DF2 = 4.302652729749462
"""t quantile 0.975 with 2 degrees of freedom (statistical tables: 4.303)."""


def pairs_with_differences(differences, reference=0.6):
    return [Pair(0, seed, reference + d, reference) for seed, d in enumerate(differences)]


def test_interval_matches_a_hand_computation():
    test = paired_test(pairs_with_differences([0.1, 0.2, 0.3]))
    # mean 0.2, sd (ddof 1) 0.1, half-width t(0.975, 2) * 0.1 / sqrt(3) = 0.248414
    assert test.test == TEST_PAIRED_T and test.n == 3
    assert test.mean_difference == pytest.approx(0.2)
    assert test.ci_high - test.mean_difference == pytest.approx(T_0975_DF2 * 0.1 / math.sqrt(3))
    assert test.ci_low == pytest.approx(0.2 - 0.248414, abs=1e-6)
    assert test.ci_high == pytest.approx(0.2 + 0.248414, abs=1e-6)
    assert test.statistic == pytest.approx(0.2 / (0.1 / math.sqrt(3)))


def test_interval_containing_zero_is_no_evidence_of_a_difference():
    comparison = compare("mean_teacher", "supervised", pairs_with_differences([0.1, -0.05, 0.07]),
                         means={"dice": (0.64, 0.60), "hd95": (9.0, 10.0)})
    assert comparison.test.ci_low < 0 < comparison.test.ci_high
    assert comparison.conclusion == NO_EVIDENCE
    sentence = verdict(comparison)
    assert sentence.startswith("mean_teacher vs supervised: test/dice +0.0400 (95 % CI -0.")
    assert "paired t-test over 3 paired runs (seeds), p = " in sentence
    assert sentence.endswith(": no evidence of a difference")
    assert "beats" not in sentence


def test_pairs_from_several_splits_are_named_as_split_by_seed():
    pairs = [Pair(split, seed, 0.6 + 0.01 * split + 0.02 * seed, 0.6) for split in (0, 1) for seed in (1, 2)]
    sentence = verdict(compare("mean_teacher", "supervised", pairs, means={"dice": (0.64, 0.60)}))
    assert "paired t-test over 4 paired runs (split × seed), p = " in sentence


def test_interval_above_zero_is_better_and_below_is_worse():
    better = compare("mean_teacher", "supervised", pairs_with_differences([0.10, 0.11, 0.12, 0.10]))
    assert better.test.ci_low > 0 and better.conclusion == "mean_teacher better"
    assert verdict(better).endswith(": mean_teacher better")
    worse = compare("mean_teacher", "supervised", pairs_with_differences([-0.10, -0.11, -0.12, -0.10]))
    assert worse.test.ci_high < 0 and worse.conclusion == "mean_teacher worse"
    assert worse.winner == "supervised"


def test_worse_on_names_distance_metrics_where_the_winner_is_larger():
    means = {"dice": (0.70, 0.60), "jaccard": (0.55, 0.45), "hd95": (14.79, 12.41), "asd": (2.0, 3.0),
             "recall": (0.65, 0.70)}
    comparison = compare("mean_teacher", "supervised", pairs_with_differences([0.10, 0.11, 0.12]), means=means)
    assert comparison.winner == "mean_teacher"
    assert [w.metric for w in comparison.worse_on] == ["hd95", "recall"], "asd is lower, jaccard higher: fine"
    assert verdict(comparison).endswith(
        ": mean_teacher better; but mean_teacher is worse on hd95 (14.79 vs 12.41 mm), recall (0.6500 vs 0.7000)")
    record = comparison.to_dict()
    assert record["worse_on"][0] == {"metric": "hd95", "winner_mean": 14.79, "other_mean": 12.41}


def test_the_winner_is_the_reference_when_the_method_has_the_lower_mean_dice():
    comparison = compare("mean_teacher", "supervised", pairs_with_differences([-0.02, 0.01, -0.05]),
                         means={"dice": (0.58, 0.60), "hd95": (8.0, 9.5)})
    assert comparison.winner == "supervised" and comparison.conclusion == NO_EVIDENCE
    assert verdict(comparison).endswith(
        "no evidence of a difference; but supervised is worse on hd95 (9.50 vs 8.00 mm)")


def test_wilcoxon_p_is_named_from_six_pairs():
    comparison = compare("m", "supervised", pairs_with_differences([0.1, 0.2, 0.15, 0.05, 0.12, 0.3]))
    assert "; Wilcoxon signed-rank p = 0.031" in verdict(comparison)
    assert "Wilcoxon" not in verdict(compare("m", "supervised", pairs_with_differences([0.1, 0.2, 0.15])))


def test_too_few_pairs_give_no_test_and_no_evidence():
    comparison = compare("m", "supervised", pairs_with_differences([0.3]))
    assert not comparison.test.ran and comparison.conclusion == NO_EVIDENCE
    assert verdict(comparison) == ("m vs supervised: test/dice +0.3000 (no paired test over 1 paired runs (seeds): "
                                   "1 paired run(s); a paired test needs at least 2): no evidence of a difference")


def test_results_json_form_has_the_interval_pairs_and_conclusion():
    comparison = compare("mean_teacher", "supervised",
                         [Pair(0, 1, 0.7, 0.6), Pair(0, 2, 0.8, 0.6), Pair(1, 1, 0.9, 0.6)])
    record = comparison.to_dict()
    assert record["pairs"] == [[0, 1, 0.7, 0.6], [0, 2, 0.8, 0.6], [1, 1, 0.9, 0.6]]
    assert record["n_pairs"] == 3 and record["test"] == "paired t-test" and record["metric"] == "test/dice"
    assert record["mean_difference"] == pytest.approx(0.2)
    assert record["ci_low"] == pytest.approx(0.2 - 0.248414, abs=1e-6)
    assert record["ci_high"] == pytest.approx(0.2 + 0.248414, abs=1e-6)
    assert record["conclusion"] == NO_EVIDENCE and record["verdict"] == verdict(comparison)
    assert math.isclose(record["p_value"], comparison.test.p_value) and record["wilcoxon_p_value"] is None


# --- the HTML report ----------------------------------------------------------------------

def final_run(method: str, split: int, seed: int, dice: float, hd95: float, per_class: dict | None = None,
              params: dict | None = None) -> TrialRun:
    metrics = {"test/dice": dice, "test/jaccard": dice / (2 - dice), "test/hd95": hd95, "test/asd": 1.0,
               "test/precision": dice, "test/recall": dice, **(per_class or {})}
    name = f"{method}-{split}-{seed}"
    return TrialRun(run_id=name, name=name, method=method, phase="final", trial_id=name, status="completed",
                    run_status="FINISHED", params={"method.name": method, "train.seed": str(seed),
                                                   "data.split": str(split), **(params or {})},
                    metrics=metrics, histories={"val/dice": [(1, 0.5)]})


def two_splits_two_seeds() -> list[TrialRun]:
    runs = []
    for split in (0, 1):
        for seed in (1, 2):
            offset = 0.1 * split + 0.01 * seed
            classes = {"test/dice/liver": 0.9, "test/hd95/liver": 4.0, "test/dice/tumour": 0.5 + offset,
                       "test/hd95/tumour": 20.0, "test/dice/tumour_nan_cases": 1.0}
            runs.append(final_run("mean_teacher", split, seed, 0.62 + offset, 14.0, classes))
            runs.append(final_run("supervised", split, seed, 0.60 + offset + (0.05 if seed == 2 else -0.05), 12.0,
                                  classes))
    return runs


def test_report_pairs_by_split_and_seed_and_shows_the_console_sentence():
    rows = {row.method: row for row in method_rows(two_splits_two_seeds())}
    comparison = rows["mean_teacher"].comparison
    assert [(p.split, p.seed) for p in comparison.pairs] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert [p.value - p.reference_value for p in comparison.pairs] == pytest.approx([0.07, -0.03, 0.07, -0.03])
    assert comparison.conclusion == NO_EVIDENCE
    assert [w.metric for w in comparison.worse_on] == ["hd95"]
    record = StudyRecord(name="demo", experiment_id="1", parent=ParentRun("p", "demo", "FINISHED", 0),
                         trials=two_splits_two_seeds(),
                         results={"range_warnings": [{"phase": "search-mean_teacher", "message": "ema_decay = 0.9135 "
                                                      "lies at the lower edge of the searched range 0.9–0.995"}]})
    page = render_page([build_study_view(record, lambda run_id, path: None)], "sqlite:////x.db")
    from html import escape

    assert escape(verdict(comparison)) in page
    assert "over splits × seeds" in page
    assert "Per class" in page and "liver Dice" in page and "tumour HD95 (mm)" in page
    assert "tumour_nan_cases" not in page
    assert "ema_decay = 0.9135 lies at the lower edge" in page


def test_importance_panel_only_for_a_search_of_two_or_more_parameters(monkeypatch):
    import semiseg.report.build as build

    record = StudyRecord(name="demo", experiment_id="1", parent=ParentRun("p", "demo", "FINISHED", 0),
                         trials=two_splits_two_seeds())
    decay = SearchedParam("method.ema_decay", complement=True)
    one = OptunaSearch("demo-search-mean_teacher", "search-mean_teacher", (decay,), 6, {"1 - method.ema_decay": 1.0})
    monkeypatch.setattr(build, "read_searches", lambda *args: SearchInfo(searches=(one,)))
    titles = [f.title for f in build.build_study_view(record, lambda run_id, path: None).figures]
    assert "Parameter importances (Optuna)" not in titles
    two = OptunaSearch("demo-search-mean_teacher", "search-mean_teacher", (decay, SearchedParam("optim.lr")), 6,
                       {"1 - method.ema_decay": 0.7, "optim.lr": 0.3})
    monkeypatch.setattr(build, "read_searches", lambda *args: SearchInfo(searches=(two,)))
    figures = {f.title: f for f in build.build_study_view(record, lambda run_id, path: None).figures}
    assert figures["Parameter importances (Optuna)"].png is not None
