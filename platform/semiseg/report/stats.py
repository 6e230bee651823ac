"""Statistics of a study: mean (std) over seeds, the paired test against supervised, cost.

Standard deviations are population standard deviations over seeds, as in the study's own
final table (``semiseg.tune.results.final_table``), so the report and the study's output
agree. Runs are paired by ``train.seed`` within the same group (method plus the study's
``group_by`` keys, e.g. ``data.num_labelled``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from semiseg.report.store import TrialRun

TEST_METRICS = ("dice", "jaccard", "hd95", "asd", "precision", "recall")
REFERENCE_METHOD = "supervised"
WILCOXON_MIN_PAIRS = 6
MIN_PAIRS = 2
SECONDS_PER_HOUR = 3600.0
WORKER_KEYS = ("semiseg.workers_per_trial", "train.workers_per_trial", "train.workers")
GPU_KEYS = ("semiseg.gpus_per_worker", "train.gpus_per_worker")
TEST_WILCOXON = "Wilcoxon signed-rank"
TEST_PAIRED_T = "paired t-test"
TEST_NONE = "none"


@dataclass(frozen=True)
class Summary:
    """Mean, population standard deviation and count of the finite values."""

    mean: float
    std: float
    n: int


def summarise(values: Iterable[float]) -> Summary:
    """Mean (population std) of the finite ``values``; NaN with n = 0 when there are none.

    Args:
        values: e.g. one test Dice per seed.

    Returns:
        The summary.
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return Summary(float("nan"), float("nan"), 0)
    mean = sum(finite) / len(finite)
    return Summary(mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite)), len(finite))


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of a method with the supervised model over seeds.

    Attributes:
        test: :data:`TEST_WILCOXON`, :data:`TEST_PAIRED_T` or :data:`TEST_NONE`.
        n: number of seed pairs.
        statistic: the test statistic (NaN when no test ran).
        p_value: two-sided p-value (NaN when no test ran).
        mean_difference: mean of (method - supervised) over the pairs (NaN without pairs).
        note: why the test is missing or degenerate, else empty.
    """

    test: str
    n: int
    statistic: float
    p_value: float
    mean_difference: float
    note: str = ""


def pair_by_seed(runs: Sequence[TrialRun], reference: Sequence[TrialRun],
                 metric: str = "test/dice") -> list[tuple[int, float, float]]:
    """``(seed, method value, reference value)`` for each seed both sides ran, sorted by seed.

    Several runs with the same seed on one side (top-k re-runs) are averaged. Runs without a
    seed or without a finite ``metric`` are left out.
    """
    ours, theirs = _by_seed(runs, metric), _by_seed(reference, metric)
    return [(seed, ours[seed], theirs[seed]) for seed in sorted(set(ours) & set(theirs))]


def _by_seed(runs: Sequence[TrialRun], metric: str) -> dict[int, float]:
    values: dict[int, list[float]] = {}
    for run in runs:
        value = run.metrics.get(metric)
        if run.seed is not None and value is not None and math.isfinite(value):
            values.setdefault(run.seed, []).append(float(value))
    return {seed: sum(v) / len(v) for seed, v in values.items()}


def paired_test(pairs: Sequence[tuple[int, float, float]]) -> PairedTest:
    """Two-sided paired test of the method against the reference.

    Wilcoxon signed-rank with at least :data:`WILCOXON_MIN_PAIRS` pairs, else a paired
    t-test (``scipy.stats.ttest_rel``); no test below :data:`MIN_PAIRS` pairs or when every
    difference is the same (the statistic is undefined).

    Args:
        pairs: from :func:`pair_by_seed`.

    Returns:
        The test used, n, statistic, p-value and mean difference.
    """
    from scipy import stats

    n = len(pairs)
    differences = [a - b for _, a, b in pairs]
    mean_difference = sum(differences) / n if n else float("nan")
    if n < MIN_PAIRS:
        return PairedTest(TEST_NONE, n, float("nan"), float("nan"), mean_difference,
                          f"{n} seed pair(s); a paired test needs at least {MIN_PAIRS}")
    if all(math.isclose(d, differences[0], rel_tol=1e-9, abs_tol=1e-12) for d in differences):
        return PairedTest(TEST_NONE, n, float("nan"), float("nan"), mean_difference,
                          "every seed pair differs by the same amount (up to rounding); the test is undefined")
    ours, theirs = [a for _, a, _ in pairs], [b for _, _, b in pairs]
    if n >= WILCOXON_MIN_PAIRS:
        result, name = stats.wilcoxon(ours, theirs), TEST_WILCOXON
    else:
        result, name = stats.ttest_rel(ours, theirs), TEST_PAIRED_T
    return PairedTest(name, n, float(result.statistic), float(result.pvalue), mean_difference)


def group_label(run: TrialRun, group_by: Sequence[str]) -> str:
    """``method`` or ``method [key=value, ...]``, the study's own final-table labels."""
    if not group_by:
        return run.method
    return f"{run.method} [" + ", ".join(f"{k}={run.params.get(k)}" for k in group_by) + "]"


def reference_label(label: str, method: str) -> str:
    """The supervised label of the same group as ``label`` (for ``method``)."""
    return REFERENCE_METHOD + label[len(method):]


@dataclass(frozen=True)
class MethodRow:
    """One row of the method table: a method (or method and group) over final-phase seeds.

    Attributes:
        label: method, or ``method [key=value]`` for grouped studies.
        method: the method name.
        runs: the final-phase runs that completed.
        metrics: ``metric -> Summary`` of the test metrics (without the ``test/`` prefix).
        best_config: the searched or method params of the re-run configuration.
        test: the paired test against supervised (None for the supervised row itself).
    """

    label: str
    method: str
    runs: Sequence[TrialRun]
    metrics: Mapping[str, Summary]
    best_config: Mapping[str, str] = field(default_factory=dict)
    test: PairedTest | None = None


def method_rows(trials: Sequence[TrialRun], group_by: Sequence[str] = (),
                searched: Mapping[str, Sequence[str]] | None = None) -> list[MethodRow]:
    """The method table: completed final-phase runs grouped by method (and ``group_by``).

    Args:
        trials: every trial of the study.
        group_by: config keys that split a method's runs into groups.
        searched: ``method -> config keys its search searched``, shown as its best configuration.

    Returns:
        One row per group: semi-supervised methods by mean test Dice (best first), then
        supervised.
    """
    final = [t for t in trials if t.is_final and t.status == "completed"]
    groups: dict[str, list[TrialRun]] = {}
    for run in final:
        groups.setdefault(group_label(run, group_by), []).append(run)
    rows = []
    for label, runs in groups.items():
        method = runs[0].method
        reference = groups.get(reference_label(label, method), [])
        test = None if method == REFERENCE_METHOD else paired_test(pair_by_seed(runs, reference))
        if test is not None and not reference:
            test = PairedTest(TEST_NONE, 0, float("nan"), float("nan"), float("nan"),
                              "no supervised runs in this group")
        rows.append(MethodRow(label=label, method=method, runs=runs,
                              metrics={m: summarise(r.metrics.get(f"test/{m}", float("nan")) for r in runs)
                                       for m in TEST_METRICS},
                              best_config=best_config(runs, (searched or {}).get(method, ())), test=test))
    return sorted(rows, key=_row_order)


def _row_order(row: MethodRow) -> tuple:
    dice = row.metrics["dice"].mean
    return (row.method == REFERENCE_METHOD, row.label if row.method == REFERENCE_METHOD else "",
            -(dice if math.isfinite(dice) else -1.0), row.label)


def best_config(runs: Sequence[TrialRun], shown_keys: Sequence[str] = ()) -> dict[str, str]:
    """The ``shown_keys`` (searched keys) of the best run by validation Dice; {} when it has none.

    Args:
        runs: the runs of one method (or group).
        shown_keys: config keys to show, e.g. the study's searched hyperparameters.

    Returns:
        ``key -> value`` as logged (strings), sorted by key.
    """
    if not runs:
        return {}
    best = max(runs, key=lambda r: r.best_val_dice if math.isfinite(r.best_val_dice) else -1.0)
    return {k: best.params[k] for k in sorted(set(shown_keys)) if k in best.params}


@dataclass(frozen=True)
class TrialCost:
    """Compute spent by one trial."""

    epochs: int
    wall_s: float
    cpus: float
    gpus: float

    @property
    def cpu_hours(self) -> float:
        """CPU-hours: wall seconds of training and validation times CPUs, over 3600."""
        return self.wall_s * self.cpus / SECONDS_PER_HOUR

    @property
    def gpu_hours(self) -> float:
        """GPU-hours: wall seconds times GPUs, over 3600."""
        return self.wall_s * self.gpus / SECONDS_PER_HOUR


def trial_cost(run: TrialRun) -> TrialCost:
    """Cost of one trial: Σ over epochs of ``time/train_s + time/val_s``, and its resources.

    CPUs per trial are ``train.threads`` times the workers per trial; GPUs per trial are
    GPUs per worker times workers. Workers and GPUs are read from the first of
    :data:`WORKER_KEYS` / :data:`GPU_KEYS` present as a tag or param (1 worker, 0 GPUs
    when none is).
    """
    wall = sum(v for key in ("time/train_s", "time/val_s") for _, v in run.histories.get(key, ())
               if math.isfinite(v))
    threads = _number(run, ("train.threads",), 1.0)
    workers = _number(run, WORKER_KEYS, 1.0)
    gpus_per_worker = _number(run, GPU_KEYS, 0.0)
    return TrialCost(epochs=run.epochs, wall_s=wall, cpus=threads * workers, gpus=gpus_per_worker * workers)


def _number(run: TrialRun, keys: Sequence[str], default: float) -> float:
    for key in keys:
        for source in (run.tags, run.params):
            try:
                value = float(source[key])
            except (KeyError, TypeError, ValueError):
                continue
            if math.isfinite(value):
                return value
    return default


@dataclass(frozen=True)
class CostRow:
    """Cost of a method (every phase) beside its result."""

    method: str
    trials: int
    epochs: int
    cpu_hours: float
    gpu_hours: float
    dice: Summary


def cost_rows(trials: Sequence[TrialRun], rows: Sequence[MethodRow]) -> list[CostRow]:
    """One cost row per method (searches and final runs together), plus a ``total`` row.

    Args:
        trials: every trial of the study.
        rows: the method table (for the mean test Dice beside the cost).

    Returns:
        Rows in the order of the method table's methods, then the methods without final
        runs, then ``total``.
    """
    order = list(dict.fromkeys([r.method for r in rows] + [t.method for t in trials]))
    result = []
    for method in order:
        mine = [t for t in trials if t.method == method]
        costs = [trial_cost(t) for t in mine]
        finals = [r for row in rows if row.method == method for r in row.runs]
        result.append(CostRow(method, len(mine), sum(c.epochs for c in costs), sum(c.cpu_hours for c in costs),
                              sum(c.gpu_hours for c in costs),
                              summarise(r.metrics.get("test/dice", float("nan")) for r in finals)))
    if result:
        result.append(CostRow("total", sum(r.trials for r in result), sum(r.epochs for r in result),
                              sum(r.cpu_hours for r in result), sum(r.gpu_hours for r in result),
                              Summary(float("nan"), float("nan"), 0)))
    return result
