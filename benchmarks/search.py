"""Section 6: search efficiency on the phantom, TPE + ASHA against random search and a grid.

Studies of the mean teacher's learning rate and consistency weight run through
:func:`semiseg.tune.run_study` on a local Ray, at a small scale that fits the time budget:

- grid: 4 learning rates × 6 consistency weights in half-decade steps across the keys'
  declared ranges, each point trained for all epochs (the study's fixed-configuration
  phase, no early stopping);
- TPE + ASHA: the platform's search (Optuna TPE after a few random start-up trials, ASHA
  on the reported epoch) over the same keys' declared ranges, with half as many trials as
  the grid has points;
- random + ASHA: the same with every trial random (TPE's start-up trials = all trials),
  isolating what the TPE model adds.

Why these keys: on 120-step trials the EMA decay is nearly inert (the teacher's warm-up
min(1 − 1/(step + 1), α) makes every α above 0.992 the same running average), so a grid
over it measures noise; the learning rate and the consistency weight shape the landscape
(val Dice 0 to 0.74 across the grid), which is what a search has to find its way through.

Every study uses the same split, seed and epochs; a configuration trains identically in
every study, so a search that lands on a grid point reproduces the grid's figure. From
the trials' ``result.json`` files each search's best validation Dice so far is traced
against the cumulative epochs spent (reports ordered by time). The grid's own curve
depends on the order it ran in (ascending learning rate, its worst order), so the
expected curve of the grid in a random order is given beside it.

Target: TPE + ASHA within one Dice point (0.01) of the grid's best using at most 25 % of
the grid's epochs. On these 120-step trials one training seed moves a configuration's
val Dice by about 0.05, so the single-seed maximum a search sees is mostly the luck of
one draw (the grid's best point reached 0.784 with seed 0 and 0.710 on seeds 1–3). The
section therefore also does what a study's final phase does: the configuration each
search would choose (after 25 % of the grid's epochs, and at its end) is trained again
on fresh seeds, and the check compares TPE's choices with the grid's on those. Both the
single-seed and the fresh-seed checks are reported.

Each search is one draw: asynchronous ASHA and TPE's constant liar depend on the order
in which results arrive, so even a fixed seed does not repeat a search exactly, hence
the median over several sampler seeds. ASHA cannot spend fewer than ``trials × grace +
(max − grace)`` epochs if one trial is to finish (reported as its floor).
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
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
SEARCH_GRID = {
    "optim.lr": (3e-4, 1e-3, 3e-3, 1e-2),
    "method.consistency": (0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
}
FRACTIONS = (0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class SearchSettings:
    """Scale of the search comparison.

    The searched keys are the grid's: the searches draw from the declared ranges of the
    same keys (``optim.lr`` 1e-4 to 1e-2, the mean teacher's ``consistency`` 0.1 to 30, both
    log-scaled), which the grid spans in half-decade steps.

    Attributes:
        config: the trials' configuration.
        epochs: epochs of a full trial (ASHA's ``max_t``).
        grid: dotted key → the grid's values; every key must have a declared search range.
        trials: trials of each TPE or random search.
        tpe_startup: random trials before TPE models the space.
        grace_period, reduction_factor: ASHA's.
        max_concurrent: trials at once.
        tpe_seeds, random_seeds: seeds of the searches (the split and training seed stay 0).
        reevaluation_seeds: fresh training seeds (1, 2, …) on which every search's chosen
            configurations are trained again, as a study's final phase does.
    """

    config: dict[str, Any] = field(default_factory=lambda: dict(SEARCH_CONFIG))
    epochs: int = 12
    grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(SEARCH_GRID))
    trials: int = 12
    tpe_startup: int = 4
    grace_period: int = 3
    reduction_factor: int = 3
    max_concurrent: int = 2
    tpe_seeds: tuple[int, ...] = (0, 1, 2)
    random_seeds: tuple[int, ...] = (0, 1)
    reevaluation_seeds: int = 3

    @classmethod
    def quick(cls) -> "SearchSettings":
        """A tiny version (only run when named with ``--only search``)."""
        config = {**SEARCH_CONFIG, "data.phantom_shape": "32x32x4", "data.phantom_cases": 12,
                  "data.num_validation": 2, "data.num_test": 2, "train.steps_per_epoch": 4, "model.width": 4}
        return cls(config=config, epochs=4, grid={"optim.lr": (1e-3, 1e-2), "method.consistency": (1.0,)},
                   trials=2, tpe_startup=1, grace_period=1, tpe_seeds=(0,), random_seeds=(), reevaluation_seeds=1)

    @property
    def points(self) -> list[dict[str, float]]:
        """The grid's points as config overrides."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*self.grid.values())]

    @property
    def search_names(self) -> list[str]:
        """The grid's keys as a study names them (``consistency`` for ``method.consistency``)."""
        return [key.removeprefix("method.") for key in self.grid]

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


def best_val_by_trial(reports: list[Report]) -> dict[str, float]:
    """Each trial's best validation Dice over its reported epochs (the platform's selection metric)."""
    best: dict[str, float] = {}
    for report in reports:
        best[report.trial] = max(best.get(report.trial, report.val_dice), report.val_dice)
    return best


def best_test(reports: list[Report]) -> float | None:
    """Test Dice of the trial with the best validation Dice among those that reached their last epoch."""
    finished = {r.trial: r for r in reports if r.test_dice is not None}
    if not finished:
        return None
    best_val = best_val_by_trial(reports)
    return float(finished[max(finished, key=best_val.get)].test_dice)


def asha_floor(trials: int, grace_period: int, max_epochs: int) -> int:
    """Fewest epochs ASHA can spend on ``trials`` trials if one of them runs to ``max_epochs``.

    Every trial runs to the first rung (``grace_period``); at least one continues to the end.
    """
    return trials * min(grace_period, max_epochs) + max(0, max_epochs - grace_period)


def expected_best_of(values: list[float], draws: int) -> float:
    """Expected maximum of ``draws`` values drawn without replacement from ``values`` (0 for no draw).

    The i-th smallest of n values is the maximum of a draw of k with probability
    C(i − 1, k − 1) / C(n, k): what a grid run in a random order reaches after k points.
    """
    ordered = sorted(values)
    draws = min(draws, len(ordered))
    if draws <= 0:
        return 0.0
    return sum(value * math.comb(index, draws - 1) for index, value in enumerate(ordered)) / math.comb(
        len(ordered), draws)


def expected_draws_until(values: list[float], target: float) -> float | None:
    """Expected number of values drawn in a random order until one is at least ``target``.

    With m of n values reaching it, the first success of a random permutation comes at
    position (n + 1) / (m + 1) on average; None when none reaches it.
    """
    reaching = sum(value >= target for value in values)
    return (len(values) + 1) / (reaching + 1) if reaching else None


def epochs_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """Epochs spent when the best validation Dice first reached ``target`` (None: never)."""
    return next((spent for spent, dice in curve if dice >= target), None)


def trial_points(experiment_root: Path, prefix: str, keys: list[str]) -> dict[str, dict[str, float]]:
    """Trial folder name → its values of ``keys`` (grid trials keep them under the variant key)."""
    from semiseg.train.contract import expand_trial_config

    points = {}
    for path in sorted(experiment_root.glob(f"{prefix}-*/trial_*/params.json")):
        config = expand_trial_config(json.loads(path.read_text()))
        points[path.parent.name] = {key: float(config[key]) for key in keys if key in config}
    return points


def landscape(reports: list[Report], points: dict[str, dict[str, float]], grid: dict[str, tuple[float, ...]]
              ) -> dict[str, Any]:
    """The grid's best validation Dice per point as a table: first key's values down, second key's across."""
    (row_key, row_values), (column_key, column_values) = list(grid.items())[:2]
    best: dict[tuple[float | None, float | None], float] = {}
    for trial, dice in best_val_by_trial(reports).items():
        point = points.get(trial, {})
        cell = (point.get(row_key), point.get(column_key))
        best[cell] = max(best.get(cell, dice), dice)
    return {"columns": [f"{row_key} \\ {column_key}", *[f"{value:g}" for value in column_values]],
            "rows": [[f"{row:g}", *[best.get((row, column)) for column in column_values]] for row in row_values]}


def incumbent(reports: list[Report], points: dict[str, dict[str, float]], epochs: float
              ) -> dict[str, float] | None:
    """The point of the trial with the best validation Dice among the first ``epochs`` reports
    (what the search would pick after spending that many epochs); None before the first report."""
    within = reports[:int(epochs)]
    if not within:
        return None
    return points[max(within, key=lambda report: report.val_dice).trial]


def point_key(point: dict[str, float]) -> tuple[tuple[str, float], ...]:
    """A hashable, order-free form of a point."""
    return tuple(sorted(point.items()))


def per_point_scores(reports: list[Report], points: dict[str, dict[str, float]], keys: list[str]
                     ) -> dict[tuple[tuple[str, float], ...], list[tuple[float, float | None]]]:
    """Point (restricted to ``keys``) → (best val Dice, test Dice) of each of its trials."""
    tests = {r.trial: r.test_dice for r in reports if r.test_dice is not None}
    scores: dict[tuple[tuple[str, float], ...], list[tuple[float, float | None]]] = {}
    for trial, best_val in sorted(best_val_by_trial(reports).items()):
        key = point_key({k: points[trial][k] for k in keys})
        scores.setdefault(key, []).append((best_val, tests.get(trial)))
    return scores


def seed_summary(runs: list[tuple[float, float | None]]) -> tuple[float | None, float | None, float | None]:
    """(mean val Dice, std of val Dice, mean test Dice) over a point's runs (None where undefined)."""
    if not runs:
        return None, None, None
    vals = [val for val, _ in runs]
    tests = [test for _, test in runs]
    return (sum(vals) / len(vals), float(statistics.pstdev(vals)) if len(vals) > 1 else None,
            sum(tests) / len(tests) if None not in tests else None)


def _study(name: str, settings: SearchSettings, sampler: str) -> Any:
    from semiseg.tune import Study

    base = dict(settings.config)
    if sampler == "grid":
        return Study(name=name, description="benchmark: grid", base=base, baselines=tuple(settings.points))
    startup = settings.tpe_startup if sampler == "tpe" else settings.trials
    return Study(name=name, description=f"benchmark: {sampler} + ASHA", base=base,
                 methods={base["method.name"]: settings.search_names}, num_samples=settings.trials,
                 grace_period=settings.grace_period, reduction_factor=settings.reduction_factor,
                 startup_trials=startup, seed_with_defaults=False)


def _reevaluation_study(settings: SearchSettings, chosen: list[dict[str, float]]) -> Any:
    """A fixed-configuration study of the chosen points on the fresh seeds 1 … ``reevaluation_seeds``."""
    from semiseg.tune import Study

    return Study(name="bench_search_reevaluation", description="benchmark: chosen configurations on fresh seeds",
                 base=dict(settings.config), baselines=tuple(chosen), final_seeds=settings.reevaluation_seeds)


def _argv(workdir: Path, settings: SearchSettings, searched: bool, seed: int) -> list[str]:
    argv = ["--storage-path", str(workdir / "runs"), "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--max-concurrent", str(settings.max_concurrent), "--max-epochs", str(settings.epochs),
            "--seed", str(seed), "--set", "train.seed=0", "--set", "data.split_seed=0"]
    return argv + (["--skip-baselines"] if searched else [])


def _searches(settings: SearchSettings) -> list[tuple[str, str, int]]:
    """(label, sampler, sampler seed) of every search, the grid first."""
    return ([("grid", "grid", 0)] + [(f"tpe s{seed}", "tpe", seed) for seed in settings.tpe_seeds]
            + [(f"random s{seed}", "random", seed) for seed in settings.random_seeds])


def run(settings: SearchSettings, workdir: Path) -> Section:
    """Run the grid and the searches, compare their best-so-far Dice per epoch spent, then train
    the configurations each would choose again on fresh seeds and compare those."""
    workdir.mkdir(parents=True, exist_ok=True)
    section = Section("Search efficiency: TPE + ASHA vs random + ASHA vs grid", settings.to_dict())
    start_ray(workdir)
    experiments = workdir / "runs" / "ray"
    keys = list(settings.grid)
    curves: dict[str, list[tuple[int, float]]] = {}
    grid_values: list[float] = []
    grid_epochs = len(settings.points) * settings.epochs
    choices: dict[str, dict[str, dict[str, float] | None]] = {}
    for label, sampler, seed in _searches(settings):
        study = _study(f"bench_search_{sampler}_{seed}", settings, sampler)
        _, wall = timed_study(study, _argv(workdir, settings, sampler != "grid", seed), workdir / "study.log")
        reports = read_reports(experiments, study.name)
        points = trial_points(experiments, study.name, keys)
        curves[label] = anytime(reports)
        choices[label] = {"share": incumbent(reports, points, EPOCH_SHARE * grid_epochs),
                          "whole": incumbent(reports, points, len(reports))}
        section.figures[f"{label}: wall"] = Figure("s", [wall], "run_study of the whole search")
        section.figures[f"{label}: epochs spent"] = Figure("epochs", [float(len(reports))], "sum over trials")
        section.figures[f"{label}: best val Dice"] = Figure("Dice", [curves[label][-1][1]], "any trial, any epoch")
        section.extra[f"{label}: test Dice of the best finished trial"] = best_test(reports)
        if sampler == "grid":
            section.extra["grid: best val Dice per point"] = landscape(reports, points, settings.grid)
            grid_values = list(best_val_by_trial(reports).values())
    _compare(section, settings, curves, grid_values)
    _reevaluate(section, settings, workdir, choices)
    return section


def _reevaluate(section: Section, settings: SearchSettings, workdir: Path,
                choices: dict[str, dict[str, dict[str, float] | None]]) -> None:
    """Train every chosen configuration on fresh seeds; check TPE's choices against the grid's."""
    chosen = []
    for picks in choices.values():
        for point in picks.values():
            if point is not None and point not in chosen:
                chosen.append(point)
    study = _reevaluation_study(settings, chosen)
    _, wall = timed_study(study, _argv(workdir, settings, False, 0), workdir / "study.log")
    experiments = workdir / "runs" / "ray"
    reports = read_reports(experiments, study.name)
    scores = per_point_scores(reports, trial_points(experiments, study.name, list(settings.grid)), list(settings.grid))
    section.figures["re-evaluation: wall"] = Figure("s", [wall], f"{len(chosen)} chosen configurations x "
                                                                 f"{settings.reevaluation_seeds} fresh seeds")

    def summary(point: dict[str, float] | None) -> tuple[float | None, float | None, float | None]:
        return seed_summary(scores.get(point_key(point), []) if point is not None else [])

    rows = []
    for label, picks in choices.items():
        for moment, point in picks.items():
            rows.append([label, "<= 25 % of the grid's epochs" if moment == "share" else "whole search",
                         ", ".join(f"{key} {value:g}" for key, value in (point or {}).items()) or "-",
                         *summary(point)])
    section.extra[f"chosen configurations on {settings.reevaluation_seeds} fresh seeds (val Dice: best epoch)"] = {
        "columns": ["search", "chosen after", "configuration", "mean val Dice", "std over seeds", "mean test Dice"],
        "rows": rows}
    grid_score = summary(choices["grid"]["whole"])[0]
    tpe = [label for label in choices if label.startswith("tpe")]
    at_share = [summary(choices[label]["share"])[0] for label in tpe]
    if grid_score is None or None in at_share:
        return
    section.checks.append(Check(
        f"TPE + ASHA's choice with <= {EPOCH_SHARE:.0%} of the grid's epochs minus the grid's choice, both trained on "
        f"{settings.reevaluation_seeds} fresh seeds (mean val Dice; median over {len(tpe)} sampler seeds)",
        median(at_share) - grid_score, -DICE_TOLERANCE, ">=",
        f"grid's choice {grid_score:.3f} on fresh seeds; TPE's {', '.join(f'{v:.3f}' for v in at_share)}"))


def _compare(section: Section, settings: SearchSettings, curves: dict[str, list[tuple[int, float]]],
             grid_values: list[float]) -> None:
    grid_epochs, grid_best = curves["grid"][-1]
    labels = list(curves)
    rows = []
    for fraction in FRACTIONS:
        budget = fraction * grid_epochs
        rows.append([f"{fraction:.0%} ({budget:.0f} epochs)", *[best_within(curves[label], budget)
                                                                 for label in labels],
                     expected_best_of(grid_values, int(budget // settings.epochs))])
    section.extra["best val Dice by epochs spent (share of the grid's epochs)"] = {
        "columns": ["epochs spent", "grid (as run)", *labels[1:], "grid in a random order (expected)"],
        "rows": rows}
    reached = [epochs_to_reach(curves[label], grid_best - DICE_TOLERANCE) for label in labels]
    draws = expected_draws_until(grid_values, grid_best - DICE_TOLERANCE)
    reached.append(None if draws is None else draws * settings.epochs)
    section.extra[f"epochs until within {DICE_TOLERANCE} of the grid's best (share of the grid's epochs)"] = {
        "columns": ["search", "epochs", "share"],
        "rows": [[label, spent, None if spent is None else spent / grid_epochs]
                 for label, spent in zip(["grid (as run)", *labels[1:], "grid in a random order (expected)"],
                                         reached)]}
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
    floor = asha_floor(settings.trials, settings.grace_period, settings.epochs)
    section.extra["ASHA's floor: epochs for one full-length trial (share of the grid's)"] = floor / grid_epochs
    grid_shape = " x ".join(f"{key} {values}" for key, values in settings.grid.items())
    section.notes.append(f"Scale: {len(settings.points)} grid points ({grid_shape}); {settings.trials} trials per "
                         f"search over the same keys' declared ranges; {settings.epochs} epochs of "
                         f"{settings.config['train.steps_per_epoch']} steps, phantom "
                         f"{settings.config['data.phantom_shape']} with {settings.config['data.num_labelled']} "
                         f"labelled cases, ASHA grace {settings.grace_period}, eta {settings.reduction_factor}; "
                         f"TPE seeds {settings.tpe_seeds}, random seeds {settings.random_seeds} (same split and "
                         f"training seed). TPE and random with the same seed share their first "
                         f"{settings.tpe_startup} trials.")
