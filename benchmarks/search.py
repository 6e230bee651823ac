"""Section 6: search efficiency on the phantom, TPE + ASHA against random search and a grid.

Three studies of the mean teacher's EMA decay and consistency weight run through
:func:`semiseg.tune.run_study` on a local Ray, at a small scale that fits the time budget:

- grid: every combination of a few decays and weights, each trained for all epochs
  (the study's fixed-configuration phase, no early stopping);
- TPE + ASHA: the platform's search (Optuna TPE with a few random start-up trials,
  ASHA on the reported epoch) with as many trials as the grid has points;
- random + ASHA: the same with every trial random (TPE's start-up trials = all trials),
  isolating what the TPE model adds.

Every study uses the same split, seed and epochs. From the trials' ``result.json`` files
each search's best validation Dice so far is traced against the cumulative epochs spent
(reports ordered by time). Target: TPE + ASHA within one Dice point (0.01) of the grid's
best using at most 25 % of the grid's epochs. Each search is one draw: asynchronous ASHA
and TPE's constant liar depend on the order in which results arrive, so even a fixed
seed does not repeat a search exactly; at this scale the curves are indicative, not a
ranking of samplers. ASHA cannot spend fewer than ``trials × grace + (max − grace)``
epochs if one trial is to finish (reported as its floor).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import Check, Figure, Section, median
from benchmarks.trials import start_ray, timed_study

DICE_TOLERANCE = 0.01
EPOCH_SHARE = 0.25
SEARCH_CONFIG = {
    "method.name": "mean_teacher",
    "data.phantom_cases": 20,
    "data.phantom_shape": "48x48x6",
    "data.num_labelled": 2,
    "data.num_validation": 4,
    "data.num_test": 4,
    "train.steps_per_epoch": 10,
    "train.batch_size": 4,
    "train.labelled_per_batch": 2,
    "model.width": 8,
    "model.depth": 2,
    "schedule.rampup_epochs": 2.0,
}
FRACTIONS = (0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class SearchSettings:
    """Scale of the search comparison.

    Attributes:
        config: the trials' configuration.
        epochs: epochs of a full trial (ASHA's ``max_t``).
        decays, weights: the grid (``method.ema_decay`` × ``method.consistency``).
        tpe_startup: random trials before TPE models the space.
        grace_period, reduction_factor: ASHA's.
        max_concurrent: trials at once.
        sampler_seeds: seeds of the TPE and random searches (the split and training seed stay 0).
    """

    config: dict[str, Any] = field(default_factory=lambda: dict(SEARCH_CONFIG))
    epochs: int = 12
    decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    weights: tuple[float, ...] = (0.3, 3.0)
    tpe_startup: int = 3
    grace_period: int = 2
    reduction_factor: int = 3
    max_concurrent: int = 2
    sampler_seeds: tuple[int, ...] = (0, 1)

    @classmethod
    def quick(cls) -> "SearchSettings":
        """A tiny version (only run when named with ``--only search``)."""
        config = {**SEARCH_CONFIG, "data.phantom_shape": "32x32x4", "data.phantom_cases": 12,
                  "data.num_validation": 2, "data.num_test": 2, "train.steps_per_epoch": 4, "model.width": 4}
        return cls(config=config, epochs=4, decays=(0.9, 0.999), weights=(1.0,), tpe_startup=1, grace_period=1,
                   sampler_seeds=(0,))

    @property
    def grid(self) -> list[dict[str, float]]:
        """The grid's points as method overrides."""
        return [{"method.ema_decay": d, "method.consistency": w} for d, w in itertools.product(self.decays,
                                                                                                self.weights)]

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data."""
        return asdict(self)


@dataclass(frozen=True)
class Report:
    """One reported epoch of one trial."""

    timestamp: float
    trial: str
    epoch: int
    val_dice: float
    test_dice: float | None


def read_reports(experiment_root: Path, prefix: str) -> list[Report]:
    """Every report of the experiments ``experiment_root/<prefix>-*``, in time order."""
    reports = []
    for path in sorted(experiment_root.glob(f"{prefix}-*/trial_*/result.json")):
        for line in path.read_text().splitlines():
            if line.strip():
                result = json.loads(line)
                reports.append(Report(float(result["timestamp"]), path.parent.name, int(result["epoch"]),
                                      float(result.get("val/dice", 0.0)), result.get("test/dice")))
    return sorted(reports, key=lambda r: (r.timestamp, r.trial, r.epoch))


def anytime(reports: list[Report]) -> list[tuple[int, float]]:
    """(cumulative epochs, best validation Dice so far) after each report."""
    curve, best = [], 0.0
    for spent, report in enumerate(reports, start=1):
        best = max(best, report.val_dice)
        curve.append((spent, best))
    return curve


def best_within(curve: list[tuple[int, float]], epochs: float) -> float:
    """Best validation Dice reached with at most ``epochs`` epochs spent (0 before the first report)."""
    reached = [dice for spent, dice in curve if spent <= epochs]
    return max(reached) if reached else 0.0


def best_test(reports: list[Report]) -> float | None:
    """Test Dice of the trial with the best validation Dice among those that reached their last epoch."""
    finished = {r.trial: r for r in reports if r.test_dice is not None}
    if not finished:
        return None
    best_val = {trial: max(r.val_dice for r in reports if r.trial == trial) for trial in finished}
    return float(finished[max(best_val, key=best_val.get)].test_dice)


def asha_floor(trials: int, grace_period: int, max_epochs: int) -> int:
    """Fewest epochs ASHA can spend on ``trials`` trials if one of them runs to ``max_epochs``.

    Every trial runs to the first rung (``grace_period``); at least one continues to the end.
    """
    return trials * min(grace_period, max_epochs) + max(0, max_epochs - grace_period)


def _study(name: str, settings: SearchSettings, sampler: str) -> Any:
    from semiseg.tune import Study

    base = dict(settings.config)
    if sampler == "grid":
        return Study(name=name, description="benchmark: grid", base=base, baselines=tuple(settings.grid))
    startup = settings.tpe_startup if sampler == "tpe" else len(settings.grid)
    return Study(name=name, description=f"benchmark: {sampler} + ASHA", base=base,
                 methods={"mean_teacher": ["ema_decay", "consistency"]}, num_samples=len(settings.grid),
                 grace_period=settings.grace_period, reduction_factor=settings.reduction_factor,
                 startup_trials=startup, seed_with_defaults=False)


def _argv(workdir: Path, settings: SearchSettings, sampler: str, seed: int) -> list[str]:
    argv = ["--storage-path", str(workdir / "runs"), "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--max-concurrent", str(settings.max_concurrent), "--max-epochs", str(settings.epochs),
            "--seed", str(seed), "--set", "train.seed=0", "--set", "data.split_seed=0"]
    return argv + ([] if sampler == "grid" else ["--skip-baselines"])


def _searches(settings: SearchSettings) -> list[tuple[str, str, int]]:
    """(label, sampler, sampler seed) of every search, the grid first."""
    return [("grid", "grid", 0)] + [(f"{sampler} s{seed}", sampler, seed) for sampler in ("tpe", "random")
                                    for seed in settings.sampler_seeds]


def run(settings: SearchSettings, workdir: Path) -> Section:
    """Run the three searches and compare their best-so-far Dice per epoch spent."""
    workdir.mkdir(parents=True, exist_ok=True)
    section = Section("Search efficiency: TPE + ASHA vs random + ASHA vs grid", settings.to_dict())
    start_ray(workdir)
    curves: dict[str, list[tuple[int, float]]] = {}
    for label, sampler, seed in _searches(settings):
        study = _study(f"bench_search_{sampler}_{seed}", settings, sampler)
        _, wall = timed_study(study, _argv(workdir, settings, sampler, seed), workdir / "study.log")
        reports = read_reports(workdir / "runs" / "ray", study.name)
        curves[label] = anytime(reports)
        section.figures[f"{label}: wall"] = Figure("s", [wall], "run_study of the whole search")
        section.figures[f"{label}: epochs spent"] = Figure("epochs", [float(len(reports))], "sum over trials")
        section.figures[f"{label}: best val Dice"] = Figure("Dice", [curves[label][-1][1]], "any trial, any epoch")
        section.extra[f"{label}: test Dice of the best finished trial"] = best_test(reports)
    _compare(section, settings, curves)
    return section


def _compare(section: Section, settings: SearchSettings, curves: dict[str, list[tuple[int, float]]]) -> None:
    grid_epochs, grid_best = curves["grid"][-1]
    labels = list(curves)
    rows = []
    for fraction in FRACTIONS:
        budget = fraction * grid_epochs
        rows.append([f"{fraction:.0%} ({budget:.0f} epochs)", *[best_within(curves[label], budget)
                                                                 for label in labels]])
    section.extra["best val Dice by epochs spent (share of the grid's epochs)"] = {
        "columns": ["epochs spent", *labels], "rows": rows}
    section.extra["curves"] = dict(curves)
    tpe = [label for label in labels if label.startswith("tpe")]
    at_share = median([best_within(curves[label], EPOCH_SHARE * grid_epochs) for label in tpe])
    whole = median([curves[label][-1][1] for label in tpe])
    spent = median([curves[label][-1][0] for label in tpe])
    section.checks.append(Check(f"TPE + ASHA best val Dice with <= {EPOCH_SHARE:.0%} of the grid's epochs minus "
                                f"the grid's best (median over {len(tpe)} seeds)", at_share - grid_best,
                                -DICE_TOLERANCE, ">=", f"grid best {grid_best:.3f} after {grid_epochs} epochs"))
    section.checks.append(Check(f"TPE + ASHA best val Dice (whole search) minus the grid's best (median over "
                                f"{len(tpe)} seeds)", whole - grid_best, -DICE_TOLERANCE, ">=",
                                f"median {spent:.0f} epochs = {spent / grid_epochs:.0%} of the grid's"))
    floor = asha_floor(len(settings.grid), settings.grace_period, settings.epochs)
    section.extra["ASHA's floor: epochs for one full-length trial (share of the grid's)"] = floor / grid_epochs
    section.notes.append(f"Scale: {len(settings.grid)} grid points (ema_decay {settings.decays} x consistency "
                         f"{settings.weights}), {len(settings.grid)} trials per search, {settings.epochs} epochs of "
                         f"{settings.config['train.steps_per_epoch']} steps, phantom "
                         f"{settings.config['data.phantom_shape']} with {settings.config['data.num_labelled']} "
                         f"labelled cases, ASHA grace {settings.grace_period}, eta {settings.reduction_factor}; "
                         f"sampler seeds {settings.sampler_seeds} (same split and training seed). TPE and random "
                         f"with the same seed share their first {settings.tpe_startup} trials.")
