"""A phase's progress on the console: one line that says how far it is, the best so far and the time left.

Tune hands a progress reporter every trial after each step of its loop
(:class:`ray.tune.ProgressReporter`: ``should_report``, then ``report``). This one writes

    search-mean_teacher: 3 done, 2 running, 4 pending, 1 stopped early, 0 errored · best val/dice 0.7123
    (method.ema_decay=0.92) · 4m12s elapsed, about 6m left

(one line): refreshed in place (``\\r``) on a terminal, and as plain lines when the output is a
file or a pipe (CI, ``ray job logs``): at most every :data:`PLAIN_INTERVAL_S` seconds, and on
every trial that ends or errors. A trial that errors gets a line of its own at once, with its
message and the path of its error file.

The counts: *done* trials trained every epoch, *stopped early* ones ended before (ASHA, or a
diverged loss), *pending* ones wait for resources or are not created yet (of the phase's
trial budget). The time left is the epochs left (the running trials' to the end; each pending
trial the mean epochs of the trials that ended, or every epoch while none has) over the epochs
finished per second so far; "estimating" until an epoch has finished.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TextIO

from ray.tune import ProgressReporter

from semiseg.tracking import METRIC_DIVERGED, METRIC_EPOCH
from semiseg.train.contract import expand_trial_config
from semiseg.tune.failures import ERROR_KEY, describe_error
from semiseg.tune.results import ERROR_FILE

PLAIN_INTERVAL_S = 30.0
"""Seconds between two plain lines (file or pipe output) when no trial ended in between."""
TERMINAL_INTERVAL_S = 1.0
"""Seconds between two refreshes of the line on a terminal."""


@dataclass(frozen=True)
class TrialCounts:
    """How many trials of a phase are in each state (they add up to the phase's budget)."""

    done: int = 0
    running: int = 0
    pending: int = 0
    stopped_early: int = 0
    errored: int = 0

    @property
    def ended(self) -> int:
        """Trials that will not train again in this run."""
        return self.done + self.stopped_early + self.errored

    def text(self) -> str:
        return (f"{self.done} done, {self.running} running, {self.pending} pending, "
                f"{self.stopped_early} stopped early, {self.errored} errored")


def trial_epochs(trial: Any) -> int:
    """The epochs a trial reported (0 before its first report; an error's last report has no epoch)."""
    return int((trial.last_result or {}).get(METRIC_EPOCH) or 0)


def count_trials(trials: Sequence[Any], max_epochs: int, total: int | None = None,
                 epochs: Mapping[str, int] | None = None) -> TrialCounts:
    """Count ``trials`` (Tune's ``Trial`` objects) by state; trials not created yet count as pending.

    Args:
        max_epochs: a trial's full length (a terminated trial with fewer stopped early).
        total: the phase's trial budget (None: the trials given).
        epochs: trial id → the most epochs seen (default: each trial's last result).
    """
    epochs = epochs or {}
    done = running = waiting = stopped = errored = 0
    for trial in trials:
        status = str(trial.status)
        if status == "ERROR":
            errored += 1
        elif status == "RUNNING":
            running += 1
        elif status == "TERMINATED":
            reached = epochs.get(trial.trial_id, trial_epochs(trial))
            diverged = bool((trial.last_result or {}).get(METRIC_DIVERGED))
            if reached >= max_epochs and not diverged:
                done += 1
            else:
                stopped += 1
        else:
            waiting += 1
    not_created = max(0, (total or 0) - len(trials))
    return TrialCounts(done, running, waiting + not_created, stopped, errored)


def best_trial_text(trials: Sequence[Any], metric: str, mode: str, keys: Sequence[str]) -> str:
    """``best val/dice 0.7123 (key=value, …)`` over every value the trials reported, only the ``keys``
    (the searched ones) of its configuration; ``""`` before any trial reported the metric."""
    best_value, best_trial = math.nan, None
    for trial in trials:
        value = (getattr(trial, "metric_analysis", None) or {}).get(metric, {}).get(mode)
        if not isinstance(value, (int, float)) or value != value:
            continue
        if best_trial is None or (value > best_value if mode == "max" else value < best_value):
            best_value, best_trial = float(value), trial
    if best_trial is None:
        return ""
    config = expand_trial_config(best_trial.config or {})
    shown = ", ".join(f"{key}={_short(config[key])}" for key in keys if key in config)
    return f"best {metric} {best_value:.4f}" + (f" ({shown})" if shown else "")


def format_duration(seconds: float) -> str:
    """``42s``, ``4m12s``, ``2h05m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def time_left_text(counts: TrialCounts, trials: Sequence[Any], epochs: Mapping[str, int], max_epochs: int,
                   elapsed_s: float) -> str:
    """``about 6m left`` from the epochs finished per second and the epochs left; ``estimating time left``
    until an epoch has finished."""
    finished_epochs = sum(epochs.get(t.trial_id, 0) for t in trials)
    if finished_epochs <= 0 or elapsed_s <= 0:
        return "estimating time left"
    ended = [t for t in trials if str(t.status) in ("TERMINATED", "ERROR")]
    expected = (sum(epochs.get(t.trial_id, 0) for t in ended) / len(ended)) if ended else max_epochs
    running_left = sum(max(0, max_epochs - epochs.get(t.trial_id, 0)) for t in trials if str(t.status) == "RUNNING")
    left = running_left + counts.pending * expected
    if left <= 0:
        return "finishing" if counts.running else "no trials left"
    return f"about {format_duration(left * elapsed_s / finished_epochs)} left"


def progress_line(phase: str, counts: TrialCounts, best: str, elapsed_s: float, time_left: str) -> str:
    """The phase's one progress line."""
    parts = [f"{phase}: {counts.text()}", best, f"{format_duration(elapsed_s)} elapsed, {time_left}"]
    return " · ".join(part for part in parts if part)


def trial_error_line(phase: str, trial: Any) -> str:
    """``phase: trial ID errored: Type: message (error file PATH)`` for a trial in state ERROR."""
    message = str((trial.last_result or {}).get(ERROR_KEY) or "")
    if not message:
        try:
            message = describe_error(trial.get_pickled_error())
        except Exception:  # an unreadable error file: the path below still says where to look
            message = ""
    path = str(getattr(trial, "path", "") or "").rstrip("/")
    kind = getattr(getattr(getattr(trial, "storage", None), "storage_filesystem", None), "type_name", "local")
    error_file = f"{path}/{ERROR_FILE}" if path else "-"
    if path and kind != "local":
        error_file = f"{kind}://{error_file}"
    return f"{phase}: trial {trial.trial_id} errored: {message or 'unknown error'} (error file {error_file})"


class StudyProgress(ProgressReporter):
    """Tune's progress reporter of one phase of a study (see the module's description).

    Args:
        phase: the phase's name (``search-mean_teacher``, ``final``).
        metric, mode: what the best trial is (``val/dice``, ``max``).
        keys: the configuration keys shown with the best trial (the searched ones).
        max_epochs: a trial's full length.
        stream: where the lines go (default: ``sys.stdout`` when reporting).
        interactive: refresh one line in place (default: whether ``stream`` is a terminal).
        clock: seconds, monotonic (tests pass their own).
        reported_errors: the set to add the ids of the errored trials whose line was printed to
            (shared with the phase's closing check, which then does not print them again).
    """

    def __init__(self, phase: str, metric: str, mode: str, keys: Sequence[str], max_epochs: int,
                 stream: TextIO | None = None, interactive: bool | None = None,
                 clock: Callable[[], float] = time.monotonic, reported_errors: set[str] | None = None) -> None:
        self.phase, self.metric, self.mode, self.keys = phase, metric, mode, list(keys)
        self.max_epochs = max_epochs
        self._stream = stream
        self._interactive = interactive
        self._clock = clock
        self._started = clock()
        self._total: int | None = None
        self._last_shown = -math.inf
        self._last_ended = 0
        self._line_open = False
        self.epochs: dict[str, int] = {}
        self.reported_errors: set[str] = set() if reported_errors is None else reported_errors
        """Ids of the trials whose error line was printed."""

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    @property
    def interactive(self) -> bool:
        if self._interactive is not None:
            return self._interactive
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def setup(self, start_time: float | None = None, total_samples: int | None = None, metric: str | None = None,
              mode: str | None = None, **kwargs: Any) -> None:
        """Tune's start of the run: the phase's trial budget (the clock starts here)."""
        self._started = self._clock()
        self._total = total_samples if total_samples and total_samples > 0 else None

    def should_report(self, trials: Sequence[Any], done: bool = False) -> bool:
        """On a terminal at most every second; else every :data:`PLAIN_INTERVAL_S` s, and when a trial ends."""
        for trial in trials:
            self.epochs[trial.trial_id] = max(self.epochs.get(trial.trial_id, 0), trial_epochs(trial))
        ended = count_trials(trials, self.max_epochs, epochs=self.epochs).ended
        if ended != self._last_ended or self._new_errors(trials):
            return True
        if done:  # the closing line, unless a plain line just said the same
            return self.interactive or self._last_shown == -math.inf
        interval = TERMINAL_INTERVAL_S if self.interactive else PLAIN_INTERVAL_S
        return self._clock() - self._last_shown >= interval

    def report(self, trials: Sequence[Any], done: bool, *sys_info: str) -> None:
        """Print the error lines of newly errored trials, then the progress line."""
        for trial in self._new_errors(trials):
            self._write_line(trial_error_line(self.phase, trial))
            self.reported_errors.add(trial.trial_id)
        self._last_ended = count_trials(trials, self.max_epochs, epochs=self.epochs).ended
        self._last_shown = self._clock()
        line = self.line(trials)
        if self.interactive:
            width = max(20, shutil.get_terminal_size().columns - 1)
            self.stream.write("\r" + line[:width] + "\x1b[K" + ("\n" if done else ""))
            self._line_open = not done
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def line(self, trials: Sequence[Any]) -> str:
        """The progress line for ``trials`` now."""
        elapsed = self._clock() - self._started
        counts = count_trials(trials, self.max_epochs, self._total, self.epochs)
        return progress_line(self.phase, counts, best_trial_text(trials, self.metric, self.mode, self.keys),
                             elapsed, time_left_text(counts, trials, self.epochs, self.max_epochs, elapsed))

    def _new_errors(self, trials: Sequence[Any]) -> list[Any]:
        return [t for t in trials if str(t.status) == "ERROR" and t.trial_id not in self.reported_errors]

    def _write_line(self, text: str) -> None:
        """A line of its own: on a terminal it replaces the open progress line, which is redrawn after it."""
        prefix = "\r\x1b[K" if self.interactive and self._line_open else ""
        self.stream.write(prefix + text + "\n")
        self._line_open = False


def _short(value: Any) -> str:
    """A configuration value for the progress line: floats with 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
