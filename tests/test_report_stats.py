"""Unit tests of the study report: statistics, cost, figures, HTML and the dashboard scripts."""

from __future__ import annotations

import importlib.util
import io
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest

from semiseg.report import figures
from semiseg.report.build import build_study_view
from semiseg.report.html import render_page
from semiseg.report.search import (OptunaSearch, SearchedParam, SearchInfo, phase_of, read_searches,
                                   searched_by_method)
from semiseg.report.stats import (TEST_NONE, TEST_PAIRED_T, CostRow, Pair, Summary, cost_rows, method_rows, pair_runs,
                                  paired_test, summarise, trial_cost)
from semiseg.report.store import ParentRun, StoreError, StudyRecord, TrialRun, check_store

REPO = Path(__file__).resolve().parents[1]


def run(method: str, seed: int | None, dice: float, *, phase: str = "final", status: str = "completed",
        name: str | None = None, params: dict | None = None, curve: tuple[float, ...] = (0.2, 0.4, 0.5),
        tags: dict | None = None, times: tuple[float, float] = (1.0, 0.5)) -> TrialRun:
    """A trial run as the store would return it."""
    all_params = {"method.name": method, "train.threads": "1", **(params or {})}
    if seed is not None:
        all_params["train.seed"] = str(seed)
    histories = {"val/dice": [(i + 1, v) for i, v in enumerate(curve)],
                 "time/train_s": [(i + 1, times[0]) for i in range(len(curve))],
                 "time/val_s": [(i + 1, times[1]) for i in range(len(curve))]}
    metrics = {"test/dice": dice, "test/jaccard": dice / (2 - dice), "test/hd95": 3.0, "test/asd": 1.0,
               "test/precision": dice, "test/recall": dice, "epoch": float(len(curve))}
    identifier = name or f"{phase}-{method}-{seed}-{dice}"
    return TrialRun(run_id=identifier.encode().hex()[:32], name=identifier, method=method, phase=phase,
                    trial_id=identifier, status=status, run_status="FINISHED", params=all_params,
                    tags=dict(tags or {}), metrics=metrics, histories=histories)


def png_image(data: bytes):
    """Decode PNG bytes with PIL."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def assert_not_blank(data: bytes | None) -> None:
    """The bytes decode to an image whose pixels are not all the same."""
    import numpy as np

    assert data is not None, "the figure function drew nothing"
    pixels = np.asarray(png_image(data).convert("RGB"), dtype=float)
    assert pixels.size > 0 and pixels.std() > 0, "the image is blank"


# --- mean (std) and the paired test -------------------------------------------------------

def test_summary_is_mean_and_sample_std_of_finite_values():
    summary = summarise([0.5, 0.7, float("nan")])
    assert summary.n == 2
    assert summary.mean == pytest.approx(0.6)
    assert summary.std == pytest.approx(math.sqrt(0.02)), "ddof 1: sqrt(((-0.1)² + 0.1²) / (2 - 1))"
    single = summarise([0.5])
    assert single.n == 1 and single.mean == 0.5 and math.isnan(single.std), "no spread from one value"
    empty = summarise([float("nan")])
    assert empty.n == 0 and math.isnan(empty.mean)


def test_pairs_are_matched_by_split_and_seed_and_duplicates_averaged():
    ours = [run("mean_teacher", 0, 0.80), run("mean_teacher", 1, 0.70), run("mean_teacher", 1, 0.90),
            run("mean_teacher", 2, 0.60), run("mean_teacher", None, 0.99),
            run("mean_teacher", 2, 0.30, params={"data.split": "1"})]
    reference = [run("supervised", 2, 0.50), run("supervised", 1, 0.65), run("supervised", 3, 0.40),
                 run("supervised", 2, 0.20, params={"data.split": "1"}),
                 run("supervised", 1, 0.1, params={"data.split": "1"})]
    assert pair_runs(ours, reference) == [(0, 1, pytest.approx(0.80), 0.65), (0, 2, 0.60, 0.50), (1, 2, 0.30, 0.20)]


def test_paired_t_test_matches_hand_computed_statistic_and_scipy():
    from scipy import stats

    ours, theirs = [0.80, 0.75, 0.90], [0.70, 0.72, 0.78]
    pairs = [Pair(0, seed, a, b) for seed, (a, b) in enumerate(zip(ours, theirs))]
    result = paired_test(pairs)
    differences = [a - b for a, b in zip(ours, theirs)]
    mean = sum(differences) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 2)
    t = mean / (sd / math.sqrt(3))
    assert result.test == TEST_PAIRED_T and result.n == 3
    assert result.statistic == pytest.approx(t)
    assert result.p_value == pytest.approx(2 * stats.t.sf(abs(t), df=2))
    assert result.p_value == pytest.approx(stats.ttest_rel(ours, theirs).pvalue)
    assert result.mean_difference == pytest.approx(mean)
    assert math.isnan(result.wilcoxon_p), "the signed-rank p is reported from six pairs only"


def test_wilcoxon_p_is_a_second_figure_from_six_pairs():
    from scipy import stats

    ours = [0.81, 0.77, 0.90, 0.66, 0.74, 0.88]
    theirs = [0.70, 0.79, 0.78, 0.60, 0.71, 0.80]
    result = paired_test([Pair(0, seed, a, b) for seed, (a, b) in enumerate(zip(ours, theirs))])
    assert result.test == TEST_PAIRED_T and result.n == 6, "the t-test stays primary (its interval is the verdict's)"
    assert result.p_value == pytest.approx(stats.ttest_rel(ours, theirs).pvalue)
    assert result.wilcoxon_p == pytest.approx(stats.wilcoxon(ours, theirs).pvalue)


@pytest.mark.parametrize("pairs", [[], [Pair(0, 0, 0.8, 0.7)], [Pair(0, 0, 0.8, 0.7), Pair(0, 1, 0.6, 0.5)]])
def test_no_test_with_too_few_pairs_or_constant_differences(pairs):
    result = paired_test(pairs)
    assert result.test == TEST_NONE and result.n == len(pairs)
    assert math.isnan(result.p_value) and math.isnan(result.statistic)
    assert math.isnan(result.ci_low) and math.isnan(result.ci_high)
    assert result.note


def test_method_rows_pair_within_the_same_group_only():
    trials = []
    for budget, offset in (("2", 0.0), ("4", 0.2)):
        for seed, (a, b) in enumerate([(0.50, 0.40), (0.55, 0.41), (0.61, 0.52)]):
            params = {"data.num_labelled": budget}
            trials.append(run("mean_teacher", seed, a + offset, params=params))
            trials.append(run("supervised", seed, b + offset, params=params))
    trials.append(run("mean_teacher", 0, 0.1, phase="search-mean_teacher"))
    trials.append(run("mean_teacher", 1, 0.1, status="diverged", params={"data.num_labelled": "2"}))
    rows = {row.label: row for row in method_rows(trials, ["data.num_labelled"])}
    assert set(rows) == {f"{m} [data.num_labelled={b}]" for m in ("mean_teacher", "supervised") for b in "24"}
    row = rows["mean_teacher [data.num_labelled=4]"]
    assert len(row.runs) == 3 and row.metrics["dice"].n == 3
    assert row.metrics["dice"].mean == pytest.approx(sum([0.70, 0.75, 0.81]) / 3)
    assert row.test is not None and row.test.n == 3 and row.test.test == TEST_PAIRED_T
    assert row.test.mean_difference == pytest.approx(sum([0.10, 0.14, 0.09]) / 3)
    assert rows["supervised [data.num_labelled=2]"].test is None
    assert row.comparison is not None and row.comparison.reference == "supervised [data.num_labelled=4]"
    assert row.comparison.pairs == [(0, 0, pytest.approx(0.70), pytest.approx(0.60)),
                                    (0, 1, pytest.approx(0.75), pytest.approx(0.61)),
                                    (0, 2, pytest.approx(0.81), pytest.approx(0.72))]


def test_method_without_supervised_in_its_group_has_no_test():
    rows = method_rows([run("mean_teacher", 0, 0.5), run("mean_teacher", 1, 0.6)])
    assert rows[0].test is not None and rows[0].test.test == TEST_NONE
    assert "no supervised" in rows[0].test.note
    assert rows[0].comparison.conclusion == "no evidence of a difference" and not rows[0].comparison.worse_on


# --- cost ---------------------------------------------------------------------------------

def test_trial_cost_multiplies_seconds_by_cpus_and_gpus():
    trial = run("mean_teacher", 0, 0.5, params={"train.threads": "4"}, curve=(0.1, 0.2),
                tags={"semiseg.workers_per_trial": "2", "semiseg.gpus_per_worker": "0.5"}, times=(10.0, 8.0))
    cost = trial_cost(trial)
    assert cost.wall_s == pytest.approx(36.0)
    assert cost.cpus == 8 and cost.gpus == 1.0 and cost.epochs == 2
    assert cost.cpu_hours == pytest.approx(36.0 * 8 / 3600)
    assert cost.gpu_hours == pytest.approx(36.0 / 3600)


def test_cost_rows_sum_every_phase_per_method_and_in_total():
    trials = [run("mean_teacher", 0, 0.5, phase="search-mean_teacher", times=(30.0, 6.0)),
              run("mean_teacher", 0, 0.6, times=(30.0, 6.0)), run("supervised", 0, 0.4, times=(12.0, 0.0))]
    rows = {r.method: r for r in cost_rows(trials, method_rows(trials))}
    assert rows["mean_teacher"].trials == 2 and rows["mean_teacher"].epochs == 6
    assert rows["mean_teacher"].cpu_hours == pytest.approx(2 * 3 * 36.0 / 3600)
    assert rows["mean_teacher"].dice.mean == pytest.approx(0.6)
    assert rows["total"].cpu_hours == pytest.approx((216.0 + 36.0) / 3600)
    assert rows["total"].gpu_hours == 0.0


# --- figures ------------------------------------------------------------------------------

def study_trials() -> list[TrialRun]:
    """Search and final trials of two methods over two labelled budgets."""
    trials = [run("mean_teacher", 0, float("nan"), phase="search-mean_teacher", status=status, curve=curve,
                  params={"method.ema_decay": decay, "optim.lr": lr})
              for status, curve, decay, lr in (("completed", (0.2, 0.5, 0.6), "0.99", "0.0001"),
                                               ("stopped_early", (0.1, 0.2), "0.9", "0.01"),
                                               ("completed", (0.3, 0.4, 0.7), "0.999", "0.001"))]
    for budget in ("2", "4"):
        for seed in (0, 1):
            trials.append(run("mean_teacher", seed, 0.5 + 0.1 * seed + 0.05 * int(budget),
                              params={"data.num_labelled": budget}))
            trials.append(run("supervised", seed, 0.4 + 0.05 * seed + 0.05 * int(budget),
                              params={"data.num_labelled": budget}))
    return trials


def test_learning_curves_png_is_not_blank():
    assert_not_blank(figures.learning_curves(study_trials()))
    assert figures.learning_curves([]) is None


def test_label_efficiency_png_needs_several_budgets():
    rows = method_rows(study_trials(), ["data.num_labelled"])
    assert_not_blank(figures.label_efficiency(rows))
    single = method_rows([t for t in study_trials() if t.params.get("data.num_labelled") != "4"],
                         ["data.num_labelled"])
    assert figures.label_efficiency(single) is None


def test_sensitivity_png_and_log_axis_rule():
    params = [SearchedParam("method.ema_decay", complement=True), SearchedParam("optim.lr")]
    assert_not_blank(figures.sensitivity(study_trials(), {"mean_teacher": params}))
    assert figures.sensitivity(study_trials(), {"mean_teacher": [SearchedParam("model.width")]}) is None
    assert figures.sensitivity(study_trials(), {"supervised": params}) is None, "only the searching method's trials"
    assert figures.use_log_axis([1e-4, 1e-2]) and not figures.use_log_axis([0.9, 0.99])
    assert not figures.use_log_axis([0.0, 100.0])


def test_importances_and_cost_png_are_not_blank():
    search = OptunaSearch("s-search-mean_teacher", params=(SearchedParam("optim.lr"),), complete=5,
                          importances={"optim.lr": 0.7, "1 - method.ema_decay": 0.3})
    assert_not_blank(figures.importances([search]))
    assert figures.importances([OptunaSearch("s-search", complete=1, note="1 complete trial")]) is None
    single = OptunaSearch("s-search-mean_teacher", params=(SearchedParam("method.ema_decay", complement=True),),
                          complete=5, importances={"1 - method.ema_decay": 1.0})
    assert figures.importances([single]) is None, "one parameter has importance 1 by construction: no panel"
    rows = [CostRow("mean_teacher", 4, 12, 0.5, 0.0, Summary(0.7, 0.02, 3)),
            CostRow("supervised", 3, 9, 0.1, 0.0, Summary(0.6, 0.03, 3))]
    assert_not_blank(figures.cost_vs_result(rows))
    assert figures.cost_vs_result([]) is None


# --- Optuna storage -----------------------------------------------------------------------

def test_read_searches_maps_complement_names_and_computes_importances(tmp_path: Path):
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s-search-mean_teacher-run1", storage=url, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("search/1-method.ema_decay", 1e-4, 0.1, log=True)
                   + 0.01 * t.suggest_float("optim.lr", 1e-4, 1e-2, log=True), n_trials=6)
    optuna.create_study(study_name="other-search-x", storage=url)
    info = read_searches(url, "s", "run1")
    assert [s.name for s in info.searches] == ["s-search-mean_teacher-run1"]
    assert info.searches[0].phase == "search-mean_teacher-run1", "only a 32-hex run id or 'local' is stripped"
    assert {p.key for p in info.params} == {"method.ema_decay", "optim.lr"}
    assert info.searches[0].complete == 6
    assert set(info.searches[0].importances or {}) == {"1 - method.ema_decay", "optim.lr"}


def test_phase_and_searched_params_by_method():
    assert phase_of("s-search-mean_teacher-" + "a" * 32, "s") == "search-mean_teacher"
    assert phase_of("s-search-local", "s") == "search"
    lr = SearchedParam("optim.lr")
    search = OptunaSearch("s-search-mean_teacher-local", phase="search-mean_teacher", params=(lr,))
    info = SearchInfo(searches=(search,))
    assert searched_by_method(info, study_trials()) == {"mean_teacher": [lr]}
    fallback = searched_by_method(SearchInfo(note="no storage"), study_trials())
    assert fallback == {"mean_teacher": [SearchedParam("method.ema_decay"), lr]}


def test_read_searches_without_storage_gives_a_note_and_creates_nothing(tmp_path: Path):
    assert read_searches(None, "s").note
    missing = tmp_path / "none" / "optuna.db"
    info = read_searches(f"sqlite:///{missing}", "s")
    assert not info.searches and "does not exist" in info.note
    assert not missing.exists()


# --- HTML ---------------------------------------------------------------------------------

class _Collector(HTMLParser):
    """Tags and attribute values of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [value or "" for _, value in attrs]
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")


def overlay_png() -> bytes:
    """A small non-blank PNG, like the overlay artifact."""
    from PIL import Image

    image = Image.new("RGB", (12, 36), "black")
    image.paste((255, 0, 0), (2, 2, 8, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def record(trials: list[TrialRun]) -> StudyRecord:
    parent = ParentRun("p" * 32, "<b>study</b>", "FINISHED", 0, tags={"semiseg.dataset": "phantom"})
    return StudyRecord(name="demo <study>", experiment_id="1", parent=parent, trials=trials)


def test_html_is_self_contained_and_escapes_store_text():
    evil = "<script>alert(1)</script>"
    trials = study_trials() + [run("mean_teacher", 3, 0.99, name=evil, curve=(0.9, 0.95, 0.99))]
    view = build_study_view(record(trials), lambda run_id, path: overlay_png() if path == "overlay.png" else None)
    page = render_page([view], "http://127.0.0.1:5000")
    parsed = _Collector()
    parsed.feed(page)
    assert "script" not in parsed.tags and "link" not in parsed.tags and "iframe" not in parsed.tags
    assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>study</b>" not in page and "demo &lt;study&gt;" in page
    assert not [v for v in parsed.attributes if "http://" in v or "https://" in v]
    assert "http://127.0.0.1:5000" in page, "the store URI is shown as text"
    assert parsed.images and all(src.startswith("data:image/png;base64,") for src in parsed.images)
    for src in parsed.images:
        import base64

        assert_not_blank(base64.b64decode(src.split(",", 1)[1]))
    assert 'class="methods"' in page and page.count("<tr") >= 2


def test_html_empty_states():
    assert "No studies in this store" in render_page([], "sqlite:////x/mlflow.db")
    view = build_study_view(record([run("mean_teacher", 0, 0.5, phase="search-mean_teacher")]),
                            lambda run_id, path: None)
    page = render_page([view], "sqlite:////x/mlflow.db")
    assert "No completed final-phase runs" in page
    assert "no overlay" in page
    assert "the curve needs several" in page


# --- store and scripts --------------------------------------------------------------------

def load_script(name: str):
    """Import ``dashboards/<name>.py`` (no work happens at import)."""
    spec = importlib.util.spec_from_file_location(f"dashboard_{name}", REPO / "dashboards" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_store_is_an_error_and_is_not_created(tmp_path: Path):
    missing = tmp_path / "runs" / "mlflow.db"
    with pytest.raises(StoreError, match="no MLflow store"):
        check_store(f"sqlite:///{missing}")
    assert not missing.exists()


def test_study_report_exits_2_with_one_line_for_a_missing_store(tmp_path: Path, capsys):
    code = load_script("study_report").main(["--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}",
                                             "--out", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "no MLflow store" in err
    assert not (tmp_path / "r.html").exists()


def test_mlflow_ui_binds_loopback_and_defaults_to_the_runs_store(tmp_path: Path, capsys):
    module = load_script("mlflow_ui")
    uri = module.store_uri(None, str(tmp_path / "runs"))
    assert uri == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    command = module.ui_command(uri, 5001)
    assert command[command.index("--host") + 1] == "127.0.0.1" and "0.0.0.0" not in command
    assert command[command.index("--port") + 1] == "5001"
    assert module.main(["--storage-path", str(tmp_path / "runs"), "--dry-run"]) == 2
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mlflow.db").touch()
    assert module.main(["--storage-path", str(tmp_path / "runs"), "--dry-run"]) == 0
    assert "--host 127.0.0.1" in capsys.readouterr().out


def test_grafana_dashboard_queries_ray_metrics_through_its_datasource_variable():
    import json

    dashboard = json.loads((REPO / "dashboards" / "grafana_study_progress.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    titles = {p["title"] for p in panels}
    assert {"Trials running", "Trials pending", "Trials terminated", "CPU utilisation", "GPU utilisation"} <= titles
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all("ray_" in t["expr"] for t in panel["targets"]), panel["title"]
    assert "datasource" in {v["name"] for v in dashboard["templating"]["list"]}
