"""Statistics of a study: mean (std) over the final runs, the paired comparison against
supervised with its verdict, and cost.

Spreads are sample standard deviations (ddof 1; NaN for a single value), as in the study's
own final table (``semiseg.tune.results.final_table``), so the report and the study's output
agree. Final runs are paired by (``data.split``, ``train.seed``) within the same group (method
plus the study's ``group_by`` keys, e.g. ``data.num_labelled``); a run without ``data.split``
ran on split 0. Several runs of one side with the same key (top-k re-runs) are averaged.

The comparison (:func:`compare`) has one primary test, the paired t-test, because its 95 %
confidence interval of the mean difference (a t-interval) is what the verdict reads: "no
evidence of a difference" when the interval contains 0, else better or worse. With
:data:`WILCOXON_MIN_PAIRS` or more pairs the Wilcoxon signed-rank p-value is reported beside
it as a second figure; below that the signed-rank test cannot reach p < 0.05 at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from semiseg.report.store import TrialRun

TEST_METRICS = ("dice", "jaccard", "hd95", "asd", "nsd", "precision", "recall")
LOWER_IS_BETTER = ("hd95", "asd")
DISTANCE_UNIT = "mm"
REFERENCE_METHOD = "supervised"
PRIMARY_METRIC = "test/dice"
SPLIT_KEY = "data.split"
SEED_KEY = "train.seed"
CONFIDENCE = 0.95
WILCOXON_MIN_PAIRS = 6
MIN_PAIRS = 2
SECONDS_PER_HOUR = 3600.0
WORKER_KEYS = ("semiseg.workers_per_trial", "train.workers_per_trial", "train.workers")
GPU_KEYS = ("semiseg.gpus_per_worker", "train.gpus_per_worker")
TEST_WILCOXON = "Wilcoxon signed-rank"
TEST_PAIRED_T = "paired t-test"
TEST_NONE = "none"
NO_EVIDENCE = "no evidence of a difference"
PER_CLASS_METRICS = ("dice", "hd95")
NAN_CASES_SUFFIX = "_nan_cases"
MIN_CLASSES = 2


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof 1) and count of the finite values."""

    mean: float
    std: float
    n: int


def summarise(values: Iterable[float]) -> Summary:
    """Mean (sample std, ddof 1) of the finite ``values``; NaN with n = 0 when there are none.

    The std is NaN for a single value (a spread needs two).

    Args:
        values: e.g. one test Dice per final run.

    Returns:
        The summary.
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return Summary(float("nan"), float("nan"), 0)
    return Summary(sum(finite) / len(finite), sample_std(finite), len(finite))


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof 1) of ``values``; NaN for fewer than two."""
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


class Pair(NamedTuple):
    """One paired observation: the same labelled split and training seed on both sides."""

    split: int
    seed: int
    value: float
    reference_value: float


def pair_key(params: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(data.split, train.seed)`` of a run's params or config; split 0 when absent.

    Returns:
        The key, or None when the seed (or a present split) is missing or not an integer.
    """
    seed = _as_int(params.get(SEED_KEY))
    split = _as_int(params.get(SPLIT_KEY, 0))
    return None if seed is None or split is None else (split, seed)


def pair_values(ours: Iterable[tuple[tuple[int, int] | None, float | None]],
                theirs: Iterable[tuple[tuple[int, int] | None, float | None]]) -> list[Pair]:
    """Pairs of the keys both sides have, sorted by (split, seed).

    Args:
        ours, theirs: ``(key, value)`` per run, key from :func:`pair_key`. Runs without a key
            or without a finite value are left out; several values of one key are averaged.

    Returns:
        One :class:`Pair` per common key.
    """
    mine, reference = _averaged(ours), _averaged(theirs)
    return [Pair(key[0], key[1], mine[key], reference[key]) for key in sorted(set(mine) & set(reference))]


def _averaged(values: Iterable[tuple[tuple[int, int] | None, float | None]]) -> dict[tuple[int, int], float]:
    grouped: dict[tuple[int, int], list[float]] = {}
    for key, value in values:
        if key is not None and value is not None and math.isfinite(value):
            grouped.setdefault(key, []).append(float(value))
    return {key: sum(v) / len(v) for key, v in grouped.items()}


def pair_runs(runs: Sequence[TrialRun], reference: Sequence[TrialRun], metric: str = PRIMARY_METRIC) -> list[Pair]:
    """Pairs of ``metric`` between ``runs`` and ``reference``, keyed by (``data.split``, ``train.seed``)."""
    return pair_values(((pair_key(r.params), r.metrics.get(metric)) for r in runs),
                       ((pair_key(r.params), r.metrics.get(metric)) for r in reference))


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of a method with its reference over (split, seed) pairs.

    Attributes:
        test: :data:`TEST_PAIRED_T` (the primary test), or :data:`TEST_NONE` when none ran.
        n: number of pairs.
        statistic: the t statistic (NaN when no test ran).
        p_value: two-sided p-value of the paired t-test (NaN when no test ran).
        mean_difference: mean of (method - reference) over the pairs (NaN without pairs).
        ci_low, ci_high: the 95 % t-interval of the mean difference,
            mean ± t(0.975, n - 1) · sd / √n with sd of ddof 1 (NaN when no test ran).
        wilcoxon_p: two-sided Wilcoxon signed-rank p-value, a second figure with
            :data:`WILCOXON_MIN_PAIRS` or more pairs (else NaN).
        note: why the test is missing or degenerate, else empty.
    """

    test: str
    n: int
    statistic: float
    p_value: float
    mean_difference: float
    ci_low: float = float("nan")
    ci_high: float = float("nan")
    wilcoxon_p: float = float("nan")
    note: str = ""

    @property
    def ran(self) -> bool:
        """Whether a test ran (and the interval is defined)."""
        return self.test != TEST_NONE


def paired_test(pairs: Sequence[Pair]) -> PairedTest:
    """Two-sided paired t-test of the method against the reference, with the 95 % interval.

    No test below :data:`MIN_PAIRS` pairs or when every difference is the same (the
    statistic and the interval are undefined). With :data:`WILCOXON_MIN_PAIRS` or more
    pairs, the Wilcoxon signed-rank p-value is added as a second figure.

    Args:
        pairs: from :func:`pair_values` or :func:`pair_runs` (only the last two fields, the
            values, are read).

    Returns:
        The test, n, statistic, p-value, mean difference and its interval.
    """
    from scipy import stats

    n = len(pairs)
    differences = [float(pair[-2]) - float(pair[-1]) for pair in pairs]
    mean_difference = sum(differences) / n if n else float("nan")
    nan = float("nan")
    if n < MIN_PAIRS:
        return PairedTest(TEST_NONE, n, nan, nan, mean_difference,
                          note=f"{n} paired run(s); a paired test needs at least {MIN_PAIRS}")
    if all(math.isclose(d, differences[0], rel_tol=1e-9, abs_tol=1e-12) for d in differences):
        return PairedTest(TEST_NONE, n, nan, nan, mean_difference,
                          note="every pair differs by the same amount (up to rounding); the test is undefined")
    standard_error = sample_std(differences) / math.sqrt(n)
    statistic = mean_difference / standard_error
    half_width = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * standard_error
    p_value = float(2 * stats.t.sf(abs(statistic), n - 1))
    wilcoxon_p = nan
    if n >= WILCOXON_MIN_PAIRS:
        wilcoxon_p = float(stats.wilcoxon(differences).pvalue)
    return PairedTest(TEST_PAIRED_T, n, statistic, p_value, mean_difference, mean_difference - half_width,
                      mean_difference + half_width, wilcoxon_p)


@dataclass(frozen=True)
class WorseOn:
    """A metric on which the side with the higher mean Dice is worse on the mean."""

    metric: str
    winner_mean: float
    other_mean: float


@dataclass(frozen=True)
class Comparison:
    """A method against its reference on one metric, with the paired test and the verdict.

    Attributes:
        method, reference: the compared labels (e.g. ``mean_teacher`` and ``supervised``).
        metric: the compared metric (``test/dice``).
        pairs: the (split, seed) pairs.
        test: the paired test over ``pairs``.
        winner: the side with the higher mean on ``metric`` ("" when tied or unknown).
        worse_on: the other metrics on which ``winner`` is worse on the mean.
    """

    method: str
    reference: str
    metric: str
    pairs: Sequence[Pair]
    test: PairedTest
    winner: str = ""
    worse_on: Sequence[WorseOn] = ()

    @property
    def conclusion(self) -> str:
        """``<method> better``, ``<method> worse`` or :data:`NO_EVIDENCE` (interval contains 0, or no test)."""
        test = self.test
        if not test.ran or not (test.ci_low > 0 or test.ci_high < 0):
            return NO_EVIDENCE
        higher = test.mean_difference > 0
        better = not higher if _short(self.metric) in LOWER_IS_BETTER else higher
        return f"{self.method} {'better' if better else 'worse'}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``results.json`` (NaN as None)."""
        test = self.test
        return {"method": self.method, "reference": self.reference, "metric": self.metric,
                "mean_difference": _json_number(test.mean_difference), "ci_low": _json_number(test.ci_low),
                "ci_high": _json_number(test.ci_high), "confidence": CONFIDENCE,
                "test": test.test, "p_value": _json_number(test.p_value),
                "wilcoxon_p_value": _json_number(test.wilcoxon_p), "n_pairs": test.n,
                "pairs": [[p.split, p.seed, p.value, p.reference_value] for p in self.pairs],
                "conclusion": self.conclusion, "note": test.note, "winner": self.winner,
                "worse_on": [{"metric": w.metric, "winner_mean": w.winner_mean, "other_mean": w.other_mean}
                             for w in self.worse_on],
                "verdict": verdict(self)}


def compare(method: str, reference: str, pairs: Sequence[Pair], metric: str = PRIMARY_METRIC,
            means: Mapping[str, tuple[float, float]] | None = None) -> Comparison:
    """The paired comparison of ``method`` with ``reference``, and where the winner is worse.

    Args:
        method, reference: labels of the two sides.
        pairs: the (split, seed) pairs of ``metric``.
        metric: the compared metric, e.g. ``test/dice``.
        means: ``metric name -> (method mean, reference mean)`` of the other metrics (names
            without the ``test/`` prefix, e.g. ``hd95``), as the final table shows them. The
            winner is the side with the higher mean on ``metric`` (the paired mean difference;
            the ``means`` entry of ``metric`` when there are no pairs); it is "worse on" a
            metric where its mean is larger for :data:`LOWER_IS_BETTER` metrics, smaller for
            the others.

    Returns:
        The comparison.
    """
    test = paired_test(pairs)
    means = dict(means or {})
    difference = test.mean_difference
    if not math.isfinite(difference) and _short(metric) in means:
        ours, theirs = means[_short(metric)]
        difference = ours - theirs
    winner = method if difference > 0 else reference if difference < 0 else ""
    worse_on = []
    for name, (ours, theirs) in means.items():
        if not winner or name == _short(metric) or not (math.isfinite(ours) and math.isfinite(theirs)):
            continue
        mine, other = (ours, theirs) if winner == method else (theirs, ours)
        if (mine > other) if name in LOWER_IS_BETTER else (mine < other):
            worse_on.append(WorseOn(name, mine, other))
    return Comparison(method, reference, metric, list(pairs), test, winner, worse_on)


def _paired_by(pairs: Sequence[Pair]) -> str:
    """``split × seed`` when the pairs come from several splits, else ``seeds``."""
    return "split × seed" if len({pair.split for pair in pairs}) > 1 else "seeds"


def verdict(comparison: Comparison) -> str:
    """One sentence: the mean difference, its 95 % interval, the test and p-value, the conclusion.

    Example: ``mean_teacher vs supervised: test/dice +0.0388 (95 % CI -0.1000 to +0.1800;
    paired t-test over 3 paired runs (seeds), p = 0.56): no evidence of a difference;
    but mean_teacher is worse on hd95 (14.79 vs 12.41 mm)``.
    """
    test, metric = comparison.test, comparison.metric
    digits = _digits(metric)
    head = f"{comparison.method} vs {comparison.reference}: {metric} {_signed(test.mean_difference, digits)}"
    if test.ran:
        detail = (f"{CONFIDENCE * 100:g} % CI {_signed(test.ci_low, digits)} to {_signed(test.ci_high, digits)}; "
                  f"{test.test} over {test.n} paired runs ({_paired_by(comparison.pairs)}), p = {_p(test.p_value)}")
        if math.isfinite(test.wilcoxon_p):
            detail += f"; {TEST_WILCOXON} p = {_p(test.wilcoxon_p)}"
    else:
        detail = f"no paired test over {test.n} paired runs ({_paired_by(comparison.pairs)}): {test.note}"
    sentence = f"{head} ({detail}): {comparison.conclusion}"
    if comparison.worse_on:
        sentence += f"; but {comparison.winner} is worse on " + ", ".join(
            f"{w.metric} ({_value(w.winner_mean, w.metric)} vs {_value(w.other_mean, w.metric)}"
            f"{' ' + DISTANCE_UNIT if w.metric in LOWER_IS_BETTER else ''})" for w in comparison.worse_on)
    return sentence


def _short(metric: str) -> str:
    """``test/dice`` -> ``dice``; ``dice`` stays."""
    return metric.split("/", 1)[1] if "/" in metric else metric


def _digits(metric: str) -> int:
    return 2 if _short(metric).split("/", 1)[0] in LOWER_IS_BETTER else 4


def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}" if math.isfinite(value) else "nan"


def _value(value: float, metric: str) -> str:
    return f"{value:.{_digits(metric)}f}"


def _p(value: float) -> str:
    """Two significant digits (three where two would round onto 0.05)."""
    text = f"{value:.2g}"
    return f"{value:.3g}" if text == "0.05" else text


def _json_number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _as_int(value: Any) -> int | None:
    """An integer from a param (``"3"``, ``3``, ``3.0``); None when missing or not integral."""
    try:
        number = float(str(value))
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) and number == int(number) else None


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
        comparison: the paired comparison and verdict against supervised (None for the
            supervised row itself).
        per_class: ``label name -> metric -> Summary`` of the per-class test metrics
            (``test/dice/<label>``, ``test/hd95/<label>``); empty for binary data.
    """

    label: str
    method: str
    runs: Sequence[TrialRun]
    metrics: Mapping[str, Summary]
    best_config: Mapping[str, str] = field(default_factory=dict)
    test: PairedTest | None = None
    comparison: Comparison | None = None
    per_class: Mapping[str, Mapping[str, Summary]] = field(default_factory=dict)


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
        metrics = {m: summarise(r.metrics.get(f"test/{m}", float("nan")) for r in runs) for m in TEST_METRICS}
        comparison = None
        if method != REFERENCE_METHOD:
            comparison = _against_reference(label, reference_label(label, method), runs, groups, metrics)
        rows.append(MethodRow(label=label, method=method, runs=runs, metrics=metrics,
                              best_config=best_config(runs, (searched or {}).get(method, ())),
                              test=comparison.test if comparison else None, comparison=comparison,
                              per_class=per_class_summaries(runs)))
    return sorted(rows, key=_row_order)


def _against_reference(label: str, reference_name: str, runs: Sequence[TrialRun],
                       groups: Mapping[str, Sequence[TrialRun]], metrics: Mapping[str, Summary]) -> Comparison:
    """The comparison of one group with the supervised group of the same labelled cases."""
    reference = groups.get(reference_name, [])
    if not reference:
        nan = float("nan")
        return Comparison(label, reference_name, PRIMARY_METRIC, [], PairedTest(
            TEST_NONE, 0, nan, nan, nan, note=f"no {REFERENCE_METHOD} runs in this group"))
    reference_metrics = {m: summarise(r.metrics.get(f"test/{m}", float("nan")) for r in reference)
                         for m in TEST_METRICS}
    return compare(label, reference_name, pair_runs(runs, reference),
                   means={m: (metrics[m].mean, reference_metrics[m].mean) for m in TEST_METRICS})


def class_labels(metrics: Iterable[Mapping[str, float]], prefix: str = "test", metric: str = "dice") -> list[str]:
    """Label names of the per-class metrics ``<prefix>/<metric>/<label>`` (``…_nan_cases`` counts left out).

    Args:
        metrics: the metrics of each run.

    Returns:
        The label names in first-seen order.
    """
    start = f"{prefix}/{metric}/"
    return list(dict.fromkeys(key[len(start):] for run in metrics for key in run
                              if key.startswith(start) and not key.endswith(NAN_CASES_SUFFIX)))


def per_class_summaries(runs: Sequence[TrialRun]) -> dict[str, dict[str, Summary]]:
    """``label -> {"dice", "hd95"} -> Summary`` of the runs' per-class test metrics.

    Empty unless the runs report per-class metrics of :data:`MIN_CLASSES` or more labels
    (binary data has one foreground class, already the table's own columns).
    """
    labels = class_labels(r.metrics for r in runs)
    if len(labels) < MIN_CLASSES:
        return {}
    return {label: {m: summarise(r.metrics.get(f"test/{m}/{label}", float("nan")) for r in runs)
                    for m in PER_CLASS_METRICS} for label in labels}


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
