"""Section 2: what a study costs beyond its trials' training, on a local Ray.

A small study (``N`` mean-teacher trials of a few epochs, searched with the platform's
TPE + ASHA, ASHA's grace period = all epochs so that no trial stops early) runs through
:func:`semiseg.tune.run_study` with ``--max-concurrent C``. Its wall time is compared with
the ideal ``Σ (time/train_s + time/val_s) / C`` summed over every reported epoch of
every trial (read from each trial's ``result.json``). Target: ≤ 1.2×. The full run's
trials are short but real (the default 2D U-Net on 96×96 slices, 20 steps per epoch,
about 3 s per epoch on one core); the quick run's are toy-sized, so that its ratio shows
the fixed cost of a study (``study wall − ideal``, in seconds) rather than a realistic
ratio. The MLflow store exists before the timed study, as it does for every study but
a store's first; creating it is timed on its own.

The excess is attributed from the same files: per trial, the first epoch's
``time_this_iter_s`` minus its train + val time minus a typical epoch's excess is the
in-process start-up (target ≤ 2 s); a middle epoch's excess is the per-epoch report +
checkpoint; the last epoch's extra excess is the test evaluation; the trials' whole-second
timestamps place the driver's time before the first trial trains and after the last
report. The loop's own start-up is also measured without Ray, in a fresh interpreter
(what every new trial process pays) and in a warm one, and the study is re-run with
Tune's ``reuse_actors=False`` forced into the runner: a fresh process per trial, what the
runner did before it reused trial processes (the before/after of that optimisation).

A second study runs one trial as a Ray Train DDP group (``--workers-per-trial 2``); its
first report's ``time_this_iter_s`` minus that epoch's train + val time is the DDP start-up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from benchmarks.common import Check, Figure, Section, usable_cores
from semiseg.tune.local_ray import init_ray

REPO = Path(__file__).resolve().parents[1]
OVERHEAD_TARGET = 1.2
STARTUP_TARGET_S = 2.0
DDP_RELEASE_WAIT_S = 10.0
STUDY_CONFIG = {
    "method.name": "mean_teacher",
    "data.phantom_cases": 16,
    "data.phantom_shape": "48x48x6",
    "data.num_labelled": 2,
    "data.num_validation": 3,
    "data.num_test": 3,
    "train.steps_per_epoch": 10,
    "train.batch_size": 4,
    "train.labelled_per_batch": 2,
    "model.width": 8,
    "model.depth": 2,
    "schedule.rampup_epochs": 1.0,
}
SHORT_TRIAL_CONFIG = {
    "method.name": "mean_teacher",
    "data.phantom_cases": 16,
    "data.phantom_shape": "96x96x6",
    "data.num_labelled": 2,
    "data.num_validation": 2,
    "data.num_test": 2,
    "schedule.rampup_epochs": 1.0,
}
"""Short real trials: the default network, batch and steps per epoch on 96×96 phantom slices."""


@dataclass(frozen=True)
class TrialSettings:
    """Sizes of the trial-overhead section.

    Attributes:
        trials: searched trials of the study.
        epochs: epochs per trial.
        max_concurrent: trials at once (``--max-concurrent``).
        config: the trials' configuration (short real mean-teacher trials; toy-sized in ``quick()``).
        ddp_workers: workers of the Ray Train trial (0: skipped).
        ddp_epochs: epochs of the Ray Train trial.
        ddp_config: the Ray Train trial's configuration (toy-sized: its start-up is the figure).
        cold_repeats: fresh-process start-up measurements.
        fresh_processes_variant: also run the study with a fresh process per trial (the
            before/after of reusing trial processes; off by default since that was adopted).
    """

    trials: int = 6
    epochs: int = 4
    max_concurrent: int = 2
    config: dict[str, Any] = field(default_factory=lambda: dict(SHORT_TRIAL_CONFIG))
    ddp_workers: int = 2
    ddp_epochs: int = 2
    ddp_config: dict[str, Any] = field(default_factory=lambda: dict(STUDY_CONFIG))
    cold_repeats: int = 2
    fresh_processes_variant: bool = False

    @classmethod
    def quick(cls) -> "TrialSettings":
        """Two toy trials of three epochs, no variants, no DDP trial."""
        config = {**STUDY_CONFIG, "data.phantom_shape": "32x32x4", "data.phantom_cases": 12,
                  "data.num_validation": 2, "data.num_test": 2, "train.steps_per_epoch": 4, "model.width": 4}
        return cls(trials=2, epochs=3, config=config, ddp_workers=0, cold_repeats=1, fresh_processes_variant=False)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data."""
        return asdict(self)


@dataclass
class TrialTimes:
    """The timing fields of one trial's reports, in epoch order."""

    train_val: list[float]
    iteration: list[float]
    total: float
    started: float
    ended: float

    @classmethod
    def from_results(cls, results: list[dict[str, Any]]) -> "TrialTimes":
        """Build from the parsed lines of a trial's ``result.json`` (timestamps are whole seconds)."""
        ordered = sorted(results, key=lambda r: (r.get("epoch", 0), r.get("training_iteration", 0)))
        first, last = ordered[0], ordered[-1]
        return cls([float(r.get("time/train_s", 0.0)) + float(r.get("time/val_s", 0.0)) for r in ordered],
                   [float(r["time_this_iter_s"]) for r in ordered], float(last["time_total_s"]),
                   float(first["timestamp"]) - float(first["time_total_s"]), float(last["timestamp"]))

    def excess(self) -> list[float]:
        """Per epoch: time between reports not spent in training or validation."""
        return [it - tv for it, tv in zip(self.iteration, self.train_val)]

    def typical_excess(self) -> float:
        """A middle epoch's excess (report + checkpoint), 0 with fewer than three epochs."""
        middle = self.excess()[1:-1]
        return statistics.median(middle) if middle else 0.0

    def startup(self) -> float:
        """First epoch's excess beyond a typical epoch's: the in-process start-up."""
        return self.excess()[0] - self.typical_excess()

    def test_evaluation(self) -> float:
        """Last epoch's excess beyond a typical epoch's (test evaluation), 0 for a one-epoch trial."""
        return self.excess()[-1] - self.typical_excess() if len(self.iteration) > 1 else 0.0


def read_trials(experiment_root: Path, prefix: str) -> list[TrialTimes]:
    """Timing of every trial of the Tune experiments ``experiment_root/<prefix>-*``."""
    trials = []
    for path in sorted(experiment_root.glob(f"{prefix}-*/trial_*/result.json")):
        results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if results:
            trials.append(TrialTimes.from_results(results))
    return trials


def _study(name: str, settings: TrialSettings, epochs: int) -> Any:
    from semiseg.tune import Study

    return Study(name=name, description="benchmark: study overhead", base=dict(settings.config),
                 methods={"mean_teacher": ["ema_decay"]}, final_seeds=0, num_samples=settings.trials,
                 grace_period=epochs, startup_trials=settings.trials, seed_with_defaults=False)


def _argv(workdir: Path, settings: TrialSettings, epochs: int, extra: list[str]) -> list[str]:
    return ["--storage-path", str(workdir / "runs"), "--tracking-uri", tracking_uri(workdir),
            "--max-concurrent", str(settings.max_concurrent), "--max-epochs", str(epochs), "--skip-baselines",
            *extra]


def start_ray(workdir: Path) -> float:
    """Start a local Ray whose workers share this run's phantom cache; return the seconds it took.

    A running Ray is reused when all its CPUs are free; otherwise (CPUs still reserved, as
    after a Ray Train trial) it is restarted so that the next study can schedule its trials.
    """
    import ray

    if ray.is_initialized():
        if free_cpus() >= usable_cores():
            return 0.0
        ray.shutdown()
    started = time.perf_counter()
    init_ray(None, num_cpus=usable_cores(), log_to_driver=False,
             env_vars={"SEMISEG_CACHE": os.environ.get("SEMISEG_CACHE", str(workdir / "cache"))})
    return time.perf_counter() - started


def free_cpus() -> float:
    """CPUs of the running Ray that no task, actor or placement group holds."""
    import ray

    return float(ray.available_resources().get("CPU", 0.0))


def reserved_after(seconds: float) -> float:
    """CPUs still held after waiting up to ``seconds`` for them to be released (0 when all are free)."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and free_cpus() < usable_cores():
        time.sleep(0.5)
    return usable_cores() - free_cpus()


def timed_study(study: Any, argv: list[str], log: Path) -> tuple[float, float]:
    """Prepare the study's data first (outside the timing), then time ``run_study``; its output goes to ``log``.

    Returns:
        The epoch time when ``run_study`` started and its wall seconds.
    """
    from semiseg.tune import run_study
    from semiseg.tune.cli import parse_args
    from semiseg.tune.checks import check_dataset
    from semiseg.tune.configs import resolve_base_config

    check_dataset(resolve_base_config(study, parse_args(study.name, "", argv)))
    with log.open("a") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle), \
            quiet_loggers("ray", "optuna"):
        epoch, started = time.time(), time.perf_counter()
        run_study(study, argv)
        return epoch, time.perf_counter() - started


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the given loggers to ERROR for a block (Tune's advice warnings would flood the console)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def run(settings: TrialSettings, workdir: Path) -> Section:
    """Run the small study (and the variants), then attribute the wall time."""
    workdir.mkdir(parents=True, exist_ok=True)
    section = Section("Trial and study overhead (local Ray)", settings.to_dict())
    section.figures["Ray start-up"] = Figure("s", [start_ray(workdir)], "ray.init of a local cluster "
                                                                        "(0 when already running)")
    section.figures["MLflow store creation"] = Figure("s", [create_store(workdir)], "a new SQLite tracking store's "
                                                      "tables (a store's first study only; outside the timed study)")
    study = _study("bench_trials", settings, settings.epochs)
    began, wall = timed_study(study, _search_argv(workdir, settings), workdir / "study.log")
    trials = read_trials(workdir / "runs" / "ray", study.name)
    _overhead(section, settings, wall, trials)
    section.extra["timeline (s of wall)"] = _timeline(trials, began, wall)
    _startups(section, settings)
    if settings.fresh_processes_variant:
        _fresh_processes(section, settings, workdir, wall)
    if settings.ddp_workers > 1:
        _ddp(section, settings, workdir)
    section.notes.append(f"Study: {settings.trials} mean_teacher trials x {settings.epochs} epochs, max concurrent "
                         f"{settings.max_concurrent}, 1 thread per trial; one run each (single measurements: "
                         f"compare within a run); output in the work folder's study.log.")
    return section


def tracking_uri(workdir: Path) -> str:
    """The benchmark's SQLite tracking store."""
    return f"sqlite:///{workdir / 'mlflow.db'}"


def create_store(workdir: Path) -> float:
    """Create the benchmark's tracking store (tables and an experiment); return the seconds it took."""
    from semiseg.tracking import Tracker

    started = time.perf_counter()
    Tracker(tracking_uri(workdir), artifact_root=workdir / "runs" / "mlartifacts").experiment_id("bench_store")
    return time.perf_counter() - started


def _search_argv(workdir: Path, settings: TrialSettings) -> list[str]:
    return _argv(workdir, settings, settings.epochs, ["--num-samples", str(settings.trials)])


def cold_start(config: dict[str, Any]) -> dict[str, float]:
    """:func:`benchmarks.cold_start.measure` in a fresh interpreter (what a new trial process pays)."""
    command = [sys.executable, "-m", "benchmarks.cold_start", json.dumps(config)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(done.stdout.strip().splitlines()[-1])


def _startups(section: Section, settings: TrialSettings) -> None:
    from benchmarks.cold_start import measure

    config = dict(settings.config)
    cold = [cold_start(config) for _ in range(settings.cold_repeats)]
    measure(config)
    warm = [measure(config)["startup_s"] for _ in range(settings.cold_repeats)]
    section.figures["fresh process: import the loop"] = Figure(
        "s", [c["import_s"] for c in cold], "python -c 'import semiseg.train.loop' (torch, pyarrow, semiseg)")
    section.figures["fresh process: run_training start-up"] = Figure(
        "s", [c["startup_s"] for c in cold], "run_training start to first report minus train+val, no Ray")
    section.figures["warm process: run_training start-up"] = Figure(
        "s", warm, "the same in a process that has run it before (what a reused trial process pays)")


@contextlib.contextmanager
def fresh_trial_processes() -> Iterator[None]:
    """Force ``reuse_actors=False`` into the runner's ``tune.TuneConfig`` for the duration of a block."""
    from ray import tune

    original = tune.TuneConfig

    def config(*args: Any, **kwargs: Any) -> Any:
        kwargs["reuse_actors"] = False
        return original(*args, **kwargs)

    tune.TuneConfig = config
    try:
        yield
    finally:
        tune.TuneConfig = original


def _fresh_processes(section: Section, settings: TrialSettings, workdir: Path, baseline_wall: float) -> None:
    study = _study("bench_trials_fresh", settings, settings.epochs)
    with fresh_trial_processes():
        _, wall = timed_study(study, _search_argv(workdir, settings), workdir / "study.log")
    trials = read_trials(workdir / "runs" / "ray", study.name)
    section.figures["study wall, reuse_actors=False"] = Figure(
        "s", [wall], "the same study with a fresh process per trial (the runner before it reused them)")
    section.figures["trial start-up, reuse_actors=False"] = Figure(
        "s", [t.startup() for t in trials], "first epoch's time beyond train+val in fresh trial processes")
    section.extra["study wall: reused / fresh trial processes"] = baseline_wall / wall


def _overhead(section: Section, settings: TrialSettings, wall: float, trials: list[TrialTimes]) -> None:
    concurrency = settings.max_concurrent
    compute = sum(sum(t.train_val) for t in trials)
    in_trial = sum(t.total for t in trials)
    ideal = compute / concurrency
    section.figures["study wall"] = Figure("s", [wall], "run_study of the whole study (dataset already prepared)")
    section.figures["ideal: sum(train+val) / concurrency"] = Figure("s", [ideal], "perfectly packed trials")
    section.figures["trial start-up (in-process)"] = Figure(
        "s", [t.startup() for t in trials], "first epoch's time beyond train+val and a typical epoch's report")
    section.figures["per-epoch report + checkpoint"] = Figure(
        "s", [t.typical_excess() for t in trials], "a middle epoch's time beyond train+val")
    section.figures["test evaluation (last epoch)"] = Figure(
        "s", [t.test_evaluation() for t in trials], "last epoch's extra time (test metrics on whole cases)")
    ratio = wall / ideal if ideal > 0 else float("nan")
    section.extra["study wall / ideal"] = ratio
    section.extra["study overhead: wall - ideal (s)"] = wall - ideal
    section.extra["trials read"] = len(trials)
    section.extra["attribution (s of wall)"] = _attribution(trials, wall, concurrency, compute, in_trial)
    trial_s = compute / len(trials) if trials else float("nan")
    section.checks.append(Check("study wall / (sum(train+val) / concurrency)", ratio, OVERHEAD_TARGET, "<=",
                                f"{len(trials)} trials of {trial_s:.1f} s train+val; overhead {wall - ideal:.1f} s"))
    section.checks.append(Check("in-process trial start-up (median)",
                                section.figures["trial start-up (in-process)"].to_dict()["median"],
                                STARTUP_TARGET_S, "<="))


def _attribution(trials: list[TrialTimes], wall: float, concurrency: int, compute: float,
                 in_trial: float) -> dict[str, Any]:
    """Where the wall time went, in wall seconds (trial-side sums divided by the concurrency)."""
    startup = sum(t.startup() for t in trials)
    reports = sum(t.typical_excess() * len(t.iteration) for t in trials)
    tests = sum(t.test_evaluation() for t in trials)
    rows = [["train + val", compute / concurrency],
            ["trial start-up", startup / concurrency],
            ["reports + checkpoints", reports / concurrency],
            ["test evaluation", tests / concurrency],
            ["driver, MLflow, Ray scheduling, process start", wall - in_trial / concurrency],
            ["study wall", wall]]
    return {"columns": ["part", "seconds"], "rows": rows}


def _timeline(trials: list[TrialTimes], began: float, wall: float) -> dict[str, Any]:
    """Driver time before the first trial trains and after the last report (±1 s: whole-second timestamps)."""
    first = min(t.started for t in trials) - began
    last = max(t.ended for t in trials) - began
    rows = [["run_study start to first trial training (MLflow, Tune, trial process start)", first],
            ["trials (first training start to last report)", last - first],
            ["last report to run_study end (results, MLflow)", wall - last]]
    return {"columns": ["part", "seconds"], "rows": rows}


def _ddp(section: Section, settings: TrialSettings, workdir: Path) -> None:
    study = _study("bench_ddp", TrialSettings(trials=1, config=settings.ddp_config), settings.ddp_epochs)
    argv = _argv(workdir, settings, settings.ddp_epochs,
                 ["--num-samples", "1", "--workers-per-trial", str(settings.ddp_workers)])
    _, wall = timed_study(study, argv, workdir / "study.log")
    trials = read_trials(workdir / "runs" / "ray", study.name)
    section.figures["DDP study wall"] = Figure("s", [wall], f"one trial, {settings.ddp_workers} Ray Train workers, "
                                                            f"{settings.ddp_epochs} epochs")
    held = reserved_after(DDP_RELEASE_WAIT_S)
    section.extra[f"CPUs still reserved {DDP_RELEASE_WAIT_S:.0f} s after the DDP study"] = held
    if held > 0:
        section.notes.append(f"After the DDP study {held:.0f} CPU(s) stayed reserved by its worker group's "
                             "placement group; later trials in the same Ray session would wait forever, so Ray "
                             "is restarted before the next study.")
    if trials:
        first = trials[0]
        section.figures["DDP trial: time to first report"] = Figure(
            "s", [first.iteration[0]], "trial start to the first epoch's report (worker group, DDP init, epoch 1)")
        section.figures["DDP trial start-up"] = Figure(
            "s", [first.iteration[0] - first.train_val[0]], "time to first report minus epoch 1's train + val")
    else:
        section.notes.append("The DDP trial left no result.json; its start-up could not be read.")
