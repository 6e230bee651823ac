"""The benchmark harness: output format, ratio bookkeeping and the grid_sample elastic deformation.

No timing is asserted anywhere: only that the figures exist, are positive and finite, and
that ratios are computed from the figures they name.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from semiseg.components import elastic as elastic_grid_sample  # noqa: E402
from benchmarks.common import Section, interleaved, rate_figure  # noqa: E402
from benchmarks.report import render  # noqa: E402
from semiseg.components import elasticdeform_reference as library_elastic  # noqa: E402

AGREEMENT_TOLERANCE = 1e-5
"""Measured: max |grid_sample - elasticdeform| is 2e-7 to 9e-7 on smooth unit-amplitude images."""


def _positive_finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _assert_ratios_match_figures(section: dict) -> None:
    for name, ratio in section["ratios"].items():
        top, bottom = section["figures"][ratio["numerator"]], section["figures"][ratio["denominator"]]
        assert ratio["numerator_median"] == pytest.approx(top["median"], rel=1e-12), name
        assert ratio["denominator_median"] == pytest.approx(bottom["median"], rel=1e-12), name
        assert ratio["value"] == pytest.approx(top["median"] / bottom["median"], rel=1e-9), name
        assert ratio["per_round"]["min"] <= ratio["per_round"]["median"] <= ratio["per_round"]["max"]
        pick = max if top["unit"].endswith("/s") else min
        assert ratio["best_value"] == pytest.approx(pick(top["samples"]) / pick(bottom["samples"]), rel=1e-9), name


def _assert_figures_well_formed(section: dict) -> None:
    assert section["figures"], "a section reports figures"
    for name, figure in section["figures"].items():
        assert figure["n"] == len(figure["samples"]) >= 1, name
        assert all(_positive_finite(v) for v in figure["samples"]), name
        assert figure["min"] <= figure["median"] <= figure["max"], name
        assert figure["unit"], name


@pytest.fixture(scope="module")
def data_run(tmp_path_factory) -> tuple[dict, str]:
    """``benchmarks/run.py --quick --only data`` once, as a user would run it."""
    out = tmp_path_factory.mktemp("bench-out")
    work = tmp_path_factory.mktemp("bench-work")
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--only", "data",
                    "--out", str(out), "--workdir", str(work)], cwd=REPO, check=True, capture_output=True, text=True)
    (json_path,) = [p for p in out.glob("*.json")]
    return json.loads(json_path.read_text()), (out / "latest.md").read_text()


def test_data_run_writes_json_with_machine_and_section(data_run):
    record, _ = data_run
    assert record["mode"] == "quick" and list(record["sections"]) == ["data"]
    machine = record["machine"]
    for key in ("cpu_model", "logical_cores", "usable_cores", "torch", "ray", "torch_threads_default",
                "load_average"):
        assert key in machine, key
    section = record["sections"]["data"]
    assert "error" not in section, section.get("error")
    for key in ("loader samples/s", "streamed loader samples/s", "supervised step samples/s",
                "mean_teacher step samples/s",
                "build_cache as stored cases/s", "cache read rows/s", "prepare_split from cache"):
        assert key in section["figures"], key
    _assert_figures_well_formed(section)
    _assert_ratios_match_figures(section)
    memory_check, stream_check = section["checks"]
    assert memory_check["measured"] == pytest.approx(section["ratios"]["loader / supervised step"]["value"])
    assert stream_check["measured"] == pytest.approx(
        section["ratios"]["streamed loader / supervised step"]["value"])
    for check in (memory_check, stream_check):
        assert check["passed"] == (check["measured"] >= check["target"])


def test_data_run_writes_markdown_tables(data_run):
    _, markdown = data_run
    assert markdown.startswith("# semiseg benchmarks")
    assert "**Machine:**" in markdown and "## Targets" in markdown and "## data:" in markdown
    assert "| loader / supervised step |" in markdown
    assert ("PASS" in markdown) or ("MISS" in markdown)


def test_step_section_reports_ratios_of_its_own_figures(tmp_path):
    from benchmarks.step import StepSettings, run
    from benchmarks.workloads import StepShape

    methods = ("supervised", "mean_teacher", "ua_mean_teacher", "cross_pseudo_supervision")
    settings = StepSettings(shape=StepShape(image=16, width=4, depth=2, batch=2, cases=8), steps=1, min_repeats=2,
                            max_repeats=2, warmup=0, methods=methods, compare_threads=1)
    section = run(settings, tmp_path).to_dict()
    _assert_figures_well_formed(section)
    _assert_ratios_match_figures(section)
    ratio = section["ratios"]["supervised / bare"]
    platform, bare = section["figures"]["throughput/supervised"], section["figures"]["throughput/bare"]
    assert ratio["value"] == pytest.approx(platform["median"] / bare["median"], rel=1e-9)
    cost = section["ratios"]["cost mean_teacher / supervised"]
    assert cost["value"] == pytest.approx(
        platform["median"] / section["figures"]["throughput/mean_teacher"]["median"], rel=1e-9)
    checks = {check["name"]: check for check in section["checks"]}
    assert list(checks) == ["supervised step vs bare loop (throughput, best rounds)",
                            "mean_teacher cost vs supervised (best rounds)",
                            "ua_mean_teacher cost vs supervised (best rounds)",
                            "cross_pseudo_supervision cost vs supervised (best rounds)"]
    assert checks["supervised step vs bare loop (throughput, best rounds)"]["measured"] == pytest.approx(
        max(platform["samples"]) / max(bare["samples"]), rel=1e-9)
    assert checks["mean_teacher cost vs supervised (best rounds)"]["measured"] == cost["best_value"]
    assert json.dumps(section)


def test_interleaved_runs_rounds_in_order_and_respects_the_repeat_bounds():
    calls: list[str] = []
    timings = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, min_repeats=2,
                          max_repeats=4, budget_s=0.0, warmup=1)
    assert calls == ["a", "b"] * 3, "one warm-up round, then the minimum once the budget is spent"
    assert timings.rounds == 2 and len(timings.cpu["a"]) == 2
    figure = rate_figure(timings, "a", 10.0, "items/s")
    assert figure.samples == [10.0 / d for d in timings.wall["a"]]


def test_markdown_escapes_pipes_and_marks_verdicts():
    section = Section("demo", {})
    section.notes.append("a note")
    from benchmarks.common import Check, Figure

    section.figures["x|y"] = Figure("s", [1.0, 2.0, 3.0])
    section.figures["z"] = Figure("s", [2.0, 2.0, 2.0])
    section.add_ratio("x over z", "x|y", "z")
    section.checks.append(Check("ratio small", section.ratios["x over z"]["value"], 0.5, "<="))
    run = {"timestamp": "t", "mode": "default", "machine": {"cpu_model": "cpu"}, "sections": {"demo": {
        **section.to_dict(), "elapsed_s": 1.0, "load_average_after": [0.1]}}, "skipped": {"search": "why"}}
    markdown = render(run)
    assert "| x\\|y | 2 | 1–3 | 3 |" in markdown
    assert "| demo | ratio small | 1 | <= 0.5 | MISS |" in markdown
    assert "## search: skipped" in markdown


def test_trial_times_attribute_startup_reports_and_test_evaluation():
    from benchmarks.trials import TrialTimes

    results = [{"epoch": e, "time/train_s": 1.0, "time/val_s": 0.5, "time_this_iter_s": it, "time_total_s": total,
                "timestamp": 100 + total} for e, it, total in ((1, 4.0, 4.0), (2, 1.7, 5.7), (3, 2.2, 7.9))]
    times = TrialTimes.from_results(results)
    assert times.typical_excess() == pytest.approx(0.2)
    assert times.startup() == pytest.approx(2.5 - 0.2)
    assert times.test_evaluation() == pytest.approx(0.7 - 0.2)
    assert times.started == pytest.approx(100.0) and times.total == pytest.approx(7.9)


def test_search_curve_tracks_the_best_dice_per_epoch_spent():
    from benchmarks.search import Report, anytime, asha_floor, best_test, best_within

    reports = [Report(1, "a", 1, 0.2, None), Report(1, "b", 1, 0.1, None), Report(2, "a", 2, 0.5, 0.4),
               Report(3, "b", 2, 0.3, 0.35)]
    curve = anytime(reports)
    assert curve == [(1, 0.2), (2, 0.2), (3, 0.5), (4, 0.5)]
    assert best_within(curve, 2.5) == 0.2 and best_within(curve, 0.5) == 0.0
    assert best_test(reports) == pytest.approx(0.4)
    assert asha_floor(6, 2, 12) == 22 and asha_floor(3, 5, 4) == 12


def test_expected_best_of_a_random_grid_order_is_the_mean_maximum_of_every_draw():
    from itertools import combinations

    from benchmarks.search import expected_best_of

    values = [0.3, 0.7, 0.1, 0.5, 0.7]
    for draws in range(1, len(values) + 1):
        subsets = list(combinations(values, draws))
        assert expected_best_of(values, draws) == pytest.approx(sum(map(max, subsets)) / len(subsets))
    assert expected_best_of(values, 0) == 0.0 and expected_best_of(values, 9) == pytest.approx(0.7)
    assert expected_best_of([0.2, 0.4], 1) == pytest.approx(0.3)


def test_expected_draws_until_a_target_is_the_mean_first_success_of_every_order():
    from itertools import permutations

    from benchmarks.search import expected_draws_until

    values = [0.2, 0.8, 0.5, 0.9]
    for target in (0.5, 0.85, 0.1):
        orders = list(permutations(values))
        first = [next(i for i, v in enumerate(order, start=1) if v >= target) for order in orders]
        assert expected_draws_until(values, target) == pytest.approx(sum(first) / len(orders))
    assert expected_draws_until(values, 0.95) is None


def test_epochs_to_reach_is_the_first_report_at_or_above_the_target():
    from benchmarks.search import epochs_to_reach

    curve = [(1, 0.2), (2, 0.2), (3, 0.5), (4, 0.6)]
    assert epochs_to_reach(curve, 0.5) == 3 and epochs_to_reach(curve, 0.55) == 4
    assert epochs_to_reach(curve, 0.61) is None


def test_grid_landscape_reads_each_trials_point_and_its_best_dice(tmp_path):
    from benchmarks.search import Report, landscape, trial_points

    variants = {"trial_a": {"optim.lr": 0.001, "method.consistency": 1.0},
                "trial_b": {"optim.lr": 0.01, "method.consistency": 1.0},
                "trial_c": {"optim.lr": 0.01, "method.consistency": 3.0}}
    for trial, variant in variants.items():
        folder = tmp_path / "bench-grid-x" / trial
        folder.mkdir(parents=True)
        (folder / "params.json").write_text(json.dumps({"method.name": "mean_teacher", "_variant": variant}))
    points = trial_points(tmp_path, "bench-grid", ["optim.lr", "method.consistency"])
    assert points == variants
    reports = [Report(1, "trial_a", 1, 0.4, None), Report(2, "trial_a", 2, 0.3, 0.3),
               Report(1, "trial_b", 1, 0.6, None), Report(2, "trial_b", 2, 0.7, 0.6),
               Report(3, "trial_c", 1, 0.1, 0.1)]
    table = landscape(reports, points, {"optim.lr": (0.001, 0.01), "method.consistency": (1.0, 3.0)})
    assert table["columns"][1:] == ["1", "3"]
    assert table["rows"] == [["0.001", 0.4, None], ["0.01", 0.7, 0.1]]


def test_incumbent_is_the_best_trial_within_the_epochs_spent_and_scores_group_by_point():
    from benchmarks.search import Report, incumbent, per_point_scores, point_key

    points = {"a": {"optim.lr": 0.01, "train.seed": 1.0}, "b": {"optim.lr": 0.001, "train.seed": 1.0},
              "c": {"optim.lr": 0.01, "train.seed": 2.0}}
    reports = [Report(1, "a", 1, 0.3, None), Report(2, "b", 1, 0.5, None), Report(3, "a", 2, 0.6, 0.55),
               Report(4, "b", 2, 0.4, 0.35), Report(5, "c", 1, 0.2, None), Report(6, "c", 2, 0.7, 0.65)]
    assert incumbent(reports, points, 0) is None
    assert incumbent(reports, points, 2) == points["b"]
    assert incumbent(reports, points, 4) == points["a"] and incumbent(reports, points, 6) == points["c"]
    scores = per_point_scores(reports, points, ["optim.lr"])
    assert scores[point_key({"optim.lr": 0.01})] == [(0.6, 0.55), (0.7, 0.65)]
    assert scores[point_key({"optim.lr": 0.001})] == [(0.5, 0.35)]


def test_seed_summary_is_mean_std_and_test_mean_over_a_points_runs():
    from benchmarks.search import seed_summary

    mean_val, std, mean_test = seed_summary([(0.6, 0.5), (0.8, 0.7)])
    assert mean_val == pytest.approx(0.7) and std == pytest.approx(0.1) and mean_test == pytest.approx(0.6)
    assert seed_summary([(0.6, None)]) == (0.6, None, None)
    assert seed_summary([]) == (None, None, None)


def test_search_settings_name_keys_the_study_can_search():
    from benchmarks.search import SearchSettings
    from semiseg.tune.space import resolve

    for settings in (SearchSettings(), SearchSettings.quick()):
        assert list(resolve(settings.config["method.name"], settings.search_names)) == list(settings.grid)
        assert len(settings.points) == math.prod(len(values) for values in settings.grid.values())
    default = SearchSettings()
    assert len(default.points) == 24 and default.trials == len(default.points) // 2
    for key, values in default.grid.items():
        declared = resolve("mean_teacher", [key.removeprefix("method.")])[key]
        assert declared.low <= min(values) and max(values) <= declared.high, key


def _smooth(shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    axes = torch.meshgrid(*[torch.linspace(0, 1, s) for s in shape], indexing="ij")
    image = sum(torch.sin(2.5 * (k + 1) * a + k) for k, a in enumerate(axes)) / len(shape)
    return image.expand(batch, 2, *shape).contiguous()


@pytest.mark.parametrize(("shape", "points", "sigma"), [((40, 48), 3, 4.0), ((33, 29), 5, 2.0),
                                                        ((16, 20, 12), 3, 2.0), ((32, 32), 2, 3.0)])
def test_grid_sample_elastic_agrees_with_elasticdeform(shape, points, sigma):
    pytest.importorskip("elasticdeform")  # the `reference` extra, installed by scripts/setup.sh --test
    image = _smooth(shape)
    displacement = library_elastic.sample_displacement(2, len(shape), sigma, points,
                                                       torch.Generator().manual_seed(3))
    ours = elastic_grid_sample.elastic_deform(image, displacement)
    reference = library_elastic.elastic_deform(image, displacement)
    assert (ours - reference).abs().max().item() <= AGREEMENT_TOLERANCE
    labels = (image[:, 0] > 0.2).long() + (image[:, 0] > 0.6).long()
    assert torch.equal(elastic_grid_sample.elastic_deform_labels(labels, displacement),
                       library_elastic.elastic_deform_labels(labels, displacement))
    assert torch.equal(elastic_grid_sample.deformed_valid_mask(image, displacement),
                       library_elastic.deformed_valid_mask(image, displacement))


def test_grid_sample_elastic_is_the_identity_for_zero_displacement():
    image = _smooth((24, 30))
    zero = torch.zeros(2, 2, 4, 4)
    assert (elastic_grid_sample.elastic_deform(image, zero) - image).abs().max().item() <= AGREEMENT_TOLERANCE
    labels = (image[:, 0] > 0).long()
    assert torch.equal(elastic_grid_sample.elastic_deform_labels(labels, zero), labels)


def test_grid_sample_elastic_gradient_matches_elasticdeform():
    pytest.importorskip("elasticdeform")  # the `reference` extra, installed by scripts/setup.sh --test
    image = _smooth((28, 24))
    displacement = library_elastic.sample_displacement(2, 2, 3.0, 3, torch.Generator().manual_seed(5))
    upstream = torch.randn(image.shape, generator=torch.Generator().manual_seed(6))
    grads = []
    for deform in (elastic_grid_sample.elastic_deform, library_elastic.elastic_deform):
        source = image.clone().requires_grad_(True)
        (deform(source, displacement) * upstream).sum().backward()
        grads.append(source.grad)
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-4


def test_spline_matrix_interpolates_the_control_points():
    matrix = elastic_grid_sample.spline_matrix(9, 3)
    assert torch.allclose(matrix.sum(dim=1), torch.ones(9, dtype=torch.float64))
    assert torch.allclose(matrix[[0, 4, 8]], torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_the_step_comparison_swaps_elasticdeform_in_and_restores_the_library():
    import semiseg.methods.transform_consistency as method_module
    from benchmarks.ema_elastic import elasticdeform_in_transform_consistency

    assert method_module.elastic_deform is elastic_grid_sample.elastic_deform, "the library runs grid_sample"
    with elasticdeform_in_transform_consistency():
        assert method_module.elastic_deform is library_elastic.elastic_deform
        assert method_module.elastic_deform_labels is library_elastic.elastic_deform_labels
        assert method_module.deformed_valid_mask is library_elastic.deformed_valid_mask
    assert method_module.elastic_deform is elastic_grid_sample.elastic_deform
    assert method_module.deformed_valid_mask is elastic_grid_sample.deformed_valid_mask


def test_grid_sample_elastic_rejects_a_mismatched_displacement():
    with pytest.raises(ValueError):
        elastic_grid_sample.elastic_deform(torch.zeros(2, 1, 8, 8), torch.zeros(3, 2, 3, 3))
    with pytest.raises(ValueError):
        elastic_grid_sample.elastic_deform(torch.zeros(2, 1, 8, 8), torch.zeros(2, 2, 3, 3), order=3)
