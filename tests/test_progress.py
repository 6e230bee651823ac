"""The study's console: the progress line of a phase, its error lines, Ray's death in one line, --help."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from semiseg.tune.failures import ERROR_KEY
from semiseg.tune.progress import (StudyProgress, best_trial_text, count_trials, format_duration, progress_line,
                                   time_left_text)

REPO = Path(__file__).resolve().parents[1]
KEYS = ["method.ema_decay"]


def trial(trial_id: str, status: str, epochs: int = 0, dice: float | None = None, decay: float = 0.9,
          error: str = "") -> SimpleNamespace:
    """A stand-in for Tune's ``Trial`` with the attributes the reporter reads."""
    result = {"epoch": epochs} if epochs else {}
    if error:
        result = {ERROR_KEY: error}
    return SimpleNamespace(
        trial_id=trial_id, status=status, last_result=result,
        metric_analysis={"val/dice": {"max": dice, "min": dice}} if dice is not None else {},
        config={"method.ema_decay": decay, "method.name": "mean_teacher", "_storage_path": "/secret/ray",
                "_variant": {"data.phantom_cases": 16}, "_dataset": {"cache": "/x"}},
        path=f"/runs/ray/search/trial_{trial_id}", storage=None, get_pickled_error=lambda: None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_counts_add_up_to_the_budget():
    trials = [trial("a", "TERMINATED", 30), trial("b", "TERMINATED", 8), trial("c", "RUNNING", 3),
              trial("d", "PENDING"), trial("e", "ERROR", error="ValueError: bad")]
    counts = count_trials(trials, max_epochs=30, total=10)
    assert (counts.done, counts.stopped_early, counts.running, counts.pending, counts.errored) == (1, 1, 1, 6, 1)
    assert counts.text() == "1 done, 1 running, 6 pending, 1 stopped early, 1 errored"


def test_best_shows_only_the_searched_keys():
    trials = [trial("a", "TERMINATED", 30, dice=0.61, decay=0.95), trial("b", "RUNNING", 5, dice=0.7123, decay=0.92)]
    text = best_trial_text(trials, "val/dice", "max", KEYS)
    assert text == "best val/dice 0.7123 (method.ema_decay=0.92)"
    assert "_storage_path" not in text and "_variant" not in text and "phantom" not in text
    assert best_trial_text([trial("a", "PENDING")], "val/dice", "max", KEYS) == ""
    assert best_trial_text(trials, "val/dice", "min", KEYS).startswith("best val/dice 0.6100")


def test_time_left_is_estimating_until_an_epoch_finished():
    pending = [trial("a", "RUNNING"), trial("b", "PENDING")]
    counts = count_trials(pending, 10, total=2)
    assert time_left_text(counts, pending, {}, 10, elapsed_s=5) == "estimating time left"
    # 10 epochs in 100 s (0.1 epoch/s); left: the running trial's 5 epochs + 2 pending × the mean of
    # the ended trials (5 epochs) = 15 epochs → 150 s
    trials = [trial("a", "TERMINATED", 5), trial("b", "RUNNING", 5), trial("c", "PENDING")]
    epochs = {"a": 5, "b": 5}
    counts = count_trials(trials, 10, total=4, epochs=epochs)
    assert counts.pending == 2
    assert time_left_text(counts, trials, epochs, 10, elapsed_s=100) == "about 2m30s left"
    assert format_duration(42) == "42s" and format_duration(3 * 3600 + 300) == "3h05m"


def test_the_line_of_a_phase():
    line = progress_line("search-mean_teacher", count_trials([trial("a", "RUNNING", 2)], 10, total=3),
                         "best val/dice 0.5000 (method.ema_decay=0.9)", 75, "about 1m00s left")
    assert line == ("search-mean_teacher: 0 done, 1 running, 2 pending, 0 stopped early, 0 errored · "
                    "best val/dice 0.5000 (method.ema_decay=0.9) · 1m15s elapsed, about 1m00s left")


def test_plain_lines_every_30_s_and_on_each_ended_trial():
    stream, clock = io.StringIO(), Clock()
    reporter = StudyProgress("search", "val/dice", "max", KEYS, 10, stream=stream, interactive=False, clock=clock)
    reporter.setup(total_samples=2)
    trials = [trial("a", "RUNNING", 1, dice=0.3), trial("b", "PENDING")]
    assert reporter.should_report(trials)
    reporter.report(trials, False)
    clock.now += 10
    assert not reporter.should_report(trials), "nothing ended and 30 s have not passed"
    clock.now += 25
    assert reporter.should_report(trials)
    reporter.report(trials, False)
    clock.now += 1
    trials = [trial("a", "TERMINATED", 10, dice=0.4), trial("b", "RUNNING", 1)]
    assert reporter.should_report(trials), "a trial ended"
    reporter.report(trials, False)
    assert not reporter.should_report(trials, done=True), "the closing line would repeat the last one"
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in stream.getvalue()
    assert lines[-1].startswith("search: 1 done, 1 running, 0 pending") and "best val/dice 0.4000" in lines[-1]
    assert "36s elapsed" in lines[-1]


def test_terminal_line_is_refreshed_in_place():
    stream, clock = io.StringIO(), Clock()
    reporter = StudyProgress("final", "val/dice", "max", KEYS, 10, stream=stream, interactive=True, clock=clock)
    reporter.setup(total_samples=1)
    trials = [trial("a", "RUNNING", 2, dice=0.3)]
    reporter.report(trials, False)
    clock.now += 0.5
    assert not reporter.should_report(trials)
    clock.now += 1
    assert reporter.should_report(trials)
    reporter.report([trial("a", "TERMINATED", 10, dice=0.5)], True)
    text = stream.getvalue()
    assert text.startswith("\rfinal: 0 done, 1 running") and text.count("\r") == 2 and text.endswith("\n")
    assert text.count("\n") == 1


def test_an_errored_trial_gets_one_line_with_its_error_file():
    stream, shown = io.StringIO(), set()
    reporter = StudyProgress("search", "val/dice", "max", KEYS, 10, stream=stream, interactive=False,
                             clock=Clock(), reported_errors=shown)
    trials = [trial("a", "ERROR", error="ValueError: depth 6 too deep for 32 px"), trial("b", "RUNNING", 1)]
    assert reporter.should_report(trials)
    reporter.report(trials, False)
    reporter.report(trials, False)
    lines = stream.getvalue().splitlines()
    errors = [line for line in lines if "errored:" in line]
    assert errors == ["search: trial a errored: ValueError: depth 6 too deep for 32 px "
                      "(error file /runs/ray/search/trial_a/error.txt)"]
    assert shown == {"a"}


def test_ray_errors_are_told_from_other_errors():
    from ray.exceptions import ActorDiedError, RaySystemError

    from semiseg.tune.ray_lost import ray_lost_line, ray_lost_reason

    assert ray_lost_reason(ValueError("bad config")) is None
    assert ray_lost_reason(RaySystemError("GCS is gone")) == "RaySystemError: System error: GCS is gone"
    wrapped = RuntimeError("Tune failed")
    wrapped.__cause__ = ActorDiedError()
    assert ray_lost_reason(wrapped).startswith("ActorDiedError: ")
    assert ray_lost_reason(ConnectionError("Failed to connect to GCS at 10.0.0.1:6379")).startswith("ConnectionError")
    assert ray_lost_reason(ConnectionError("peer reset by the MLflow server")) is None
    line = ray_lost_line("final", "ActorDiedError: x", "python studies/ema_sweep.py --resume")
    assert "\n" not in line and line.endswith("resume with: python studies/ema_sweep.py --resume")


def test_fit_phase_turns_ray_errors_into_one_error():
    from ray.exceptions import RaySystemError

    from semiseg.tune.phases import fit_phase
    from semiseg.tune.ray_lost import RayLostError

    class Tuner:
        def fit(self):
            raise RaySystemError("lost the GCS")

    with pytest.raises(RayLostError, match="search-x: RaySystemError"):
        fit_phase(Tuner(), "search-x")


def test_help_shows_the_study_once_and_no_empty_defaults(capsys):
    from semiseg.tune.cli import parse_args, study_description
    from tests.integration.conftest import load_study

    study = load_study("ema_sweep").STUDY
    with pytest.raises(SystemExit):
        parse_args("ema_sweep.py", study_description(study), ["--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "study default if unset" not in text
    assert "ema_decay 0.5 … 0.995" in text and "10 trials per search, 30 epochs per trial" in text
    assert "results.json" in text and "--verbose" in text and "(default: 0)" in text
    assert text.count(study.description) == 1


def test_mlflow_hint_names_the_environments_executable(monkeypatch, tmp_path):
    from semiseg.tracking import mlflow_ui_hint

    (tmp_path / "mlflow").write_text("")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    assert mlflow_ui_hint("sqlite:////r/mlflow.db", "3").startswith(f"{tmp_path / 'mlflow'} ui ")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "elsewhere" / "python"))
    assert mlflow_ui_hint("sqlite:////r/mlflow.db", "3").startswith("mlflow ui ")


def test_mlflow_registry_prints_go_to_the_log():
    from semiseg.tune.console import LibraryPrintFilter

    console, diverted = io.StringIO(), []
    stream = LibraryPrintFilter(console, diverted.append)
    print("Successfully registered model 'semiseg-x'.", file=stream)
    print("warning: MLflow unreachable", file=stream)
    assert diverted == ["Successfully registered model 'semiseg-x'."]
    assert console.getvalue() == "warning: MLflow unreachable\n"
