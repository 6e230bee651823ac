"""A phase that Tune ended on SIGINT stops the study (unit level: no Ray)."""

from __future__ import annotations

import signal
import sys

import pytest

from semiseg.tune.phases import StudyInterruptedError, fit_phase
from semiseg.tune.runner import resume_command


class _Results:
    def __init__(self, terminated: int, errors: int, total: int) -> None:
        self.num_terminated, self.num_errors, self._total = terminated, errors, total

    def __len__(self) -> int:
        return self._total


class _Tuner:
    """Does with SIGINT what Tune's fit does: installs its handler, which on a signal puts back the one it found."""

    def __init__(self, results: _Results, interrupted: bool) -> None:
        self.results, self.interrupted = results, interrupted

    def fit(self) -> _Results:
        found = signal.getsignal(signal.SIGINT)

        def tune_handler(signum, frame):
            signal.signal(signal.SIGINT, found)

        signal.signal(signal.SIGINT, tune_handler)
        if self.interrupted:
            signal.raise_signal(signal.SIGINT)
        return self.results


def test_a_run_that_ended_by_itself_is_returned_and_the_handler_put_back():
    before = signal.getsignal(signal.SIGINT)
    results = _Results(terminated=3, errors=1, total=4)
    assert fit_phase(_Tuner(results, interrupted=False), "search-x") is results
    assert signal.getsignal(signal.SIGINT) is before


def test_a_run_tune_stopped_on_sigint_stops_the_study_though_its_trials_look_terminated():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(StudyInterruptedError, match="final"):
        fit_phase(_Tuner(_Results(terminated=3, errors=0, total=3), interrupted=True), "final")
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_command_repeats_the_invocation_with_resume(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["studies/ema_sweep.py", "--num-samples", "3"])
    assert resume_command() == f"{sys.executable} studies/ema_sweep.py --num-samples 3 --resume"
    assert resume_command(["--resume", "--smoke"]) == f"{sys.executable} studies/ema_sweep.py --resume --smoke"
    monkeypatch.setattr(sys, "argv", ["x.py"])
    assert resume_command(["--set", "data.name=a b"]).endswith("x.py --set 'data.name=a b' --resume")
