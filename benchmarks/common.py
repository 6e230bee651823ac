"""Timing, statistics, result records and the machine description shared by every section.

The machine the benchmarks run on may be shared and noisy, so comparisons are made
*within one run*: the compared variants are interleaved (A B C A B C …), every figure
keeps all its repeats, and a ratio is reported both as the ratio of the medians and as
the median (and range) of the per-round ratios, which cancels slow drifts in the load.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

Work = Callable[[], None]


@dataclass
class Figure:
    """Repeated measurements of one quantity (higher or lower is better, per its unit)."""

    unit: str
    samples: list[float]
    help: str = ""
    cpu_samples: list[float] | None = None

    @property
    def higher_is_better(self) -> bool:
        """Rates (``…/s``) are better high; durations and other quantities are better low."""
        return self.unit.endswith("/s")

    @property
    def best(self) -> float:
        """The least disturbed sample: the highest rate or the shortest duration.

        On a shared machine other tenants only ever slow a measurement down, so the best
        round is the closest to the code's own cost (the reasoning of Python's ``timeit``).
        """
        return max(self.samples) if self.higher_is_better else min(self.samples)

    def to_dict(self) -> dict[str, Any]:
        """Median, range and the raw samples (and the same figure from process CPU time, if kept)."""
        record = {"unit": self.unit, "median": median(self.samples), "min": min(self.samples),
                  "max": max(self.samples), "n": len(self.samples), "samples": list(self.samples),
                  "help": self.help}
        if self.cpu_samples:
            record["cpu_median"] = median(self.cpu_samples)
            record["cpu_samples"] = list(self.cpu_samples)
        return record


@dataclass
class Check:
    """A measured value against a target: ``measured <op> target``."""

    name: str
    measured: float
    target: float
    op: str
    note: str = ""

    @property
    def passed(self) -> bool:
        """Whether the target is met (a non-finite measurement never passes)."""
        if not math.isfinite(self.measured):
            return False
        return self.measured <= self.target if self.op == "<=" else self.measured >= self.target

    def to_dict(self) -> dict[str, Any]:
        """The check with its verdict."""
        return {"name": self.name, "measured": self.measured, "target": self.target, "op": self.op,
                "passed": self.passed, "note": self.note}


@dataclass
class Section:
    """What one benchmark section reports."""

    title: str
    settings: dict[str, Any]
    figures: dict[str, Figure] = field(default_factory=dict)
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add_ratio(self, name: str, numerator: str, denominator: str, help: str = "") -> float:
        """Record ``median(numerator) / median(denominator)``, the ratio of the best rounds and the
        per-round ratios; return the ratio of medians."""
        top, bottom = self.figures[numerator], self.figures[denominator]
        record = ratio(top.samples, bottom.samples)
        record["best_value"] = top.best / bottom.best
        record.update({"numerator": numerator, "denominator": denominator, "help": help})
        if top.cpu_samples and bottom.cpu_samples:
            record["cpu_value"] = median(top.cpu_samples) / median(bottom.cpu_samples)
        self.ratios[name] = record
        return record["value"]

    def to_dict(self) -> dict[str, Any]:
        """The section as plain JSON-able data."""
        return {"title": self.title, "settings": self.settings,
                "figures": {k: v.to_dict() for k, v in self.figures.items()},
                "ratios": self.ratios, "checks": [c.to_dict() for c in self.checks],
                "notes": list(self.notes), "extra": self.extra}


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    return float(statistics.median(values))


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict[str, Any]:
    """Ratio of medians, plus median/min/max of the per-round ratios (paired by position)."""
    pairs = [a / b for a, b in zip(numerator, denominator) if b]
    value = median(numerator) / median(denominator)
    return {"value": value, "numerator_median": median(numerator), "denominator_median": median(denominator),
            "per_round": {"median": median(pairs), "min": min(pairs), "max": max(pairs), "n": len(pairs)}}


@dataclass
class Timings:
    """Wall and process-CPU seconds of each variant, round ``i`` at position ``i``."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]

    @property
    def rounds(self) -> int:
        """Timed rounds completed."""
        return min((len(v) for v in self.wall.values()), default=0)


def interleaved(variants: Mapping[str, Work], min_repeats: int, max_repeats: int | None = None,
                budget_s: float = math.inf, warmup: int = 1) -> Timings:
    """Time each variant in interleaved rounds (A B C, A B C, …).

    Rounds continue until ``max_repeats`` are done or, once ``min_repeats`` are done, the
    timed rounds have used ``budget_s`` seconds (so a loaded machine still finishes).

    Args:
        variants: name → a callable doing one fixed unit of work.
        min_repeats: timed rounds always run.
        max_repeats: most timed rounds (``min_repeats`` when None).
        budget_s: wall-time budget of the timed rounds.
        warmup: untimed rounds first (allocator, caches, lazy initialisation).

    Returns:
        Wall and process-CPU durations per variant.
    """
    for _ in range(warmup):
        for work in variants.values():
            work()
    timings = Timings({name: [] for name in variants}, {name: [] for name in variants})
    started = time.perf_counter()
    limit = max(min_repeats, max_repeats or min_repeats)
    while timings.rounds < limit:
        if timings.rounds >= min_repeats and time.perf_counter() - started > budget_s:
            break
        for name, work in variants.items():
            wall, cpu = time.perf_counter(), time.process_time()
            work()
            timings.cpu[name].append(time.process_time() - cpu)
            timings.wall[name].append(time.perf_counter() - wall)
    return timings


def rates(durations: Sequence[float], items: float) -> list[float]:
    """Items per second of each duration."""
    return [items / d for d in durations]


def rate_figure(timings: Timings, name: str, items: float, unit: str, help: str = "") -> Figure:
    """Items per wall second of one variant, with the same rate per process-CPU second alongside."""
    cpu = [items / d for d in timings.cpu[name] if d > 0]
    return Figure(unit, rates(timings.wall[name], items), help, cpu or None)


def seconds_figure(timings: Timings, name: str, scale: float = 1.0, unit: str = "s", help: str = "") -> Figure:
    """Wall seconds (times ``scale``) of one variant, with process-CPU seconds alongside."""
    return Figure(unit, [d * scale for d in timings.wall[name]], help, [d * scale for d in timings.cpu[name]])


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parallel_backend() -> str:
    """torch's intra-op backend line (e.g. ``OpenMP 201511 (a.k.a. OpenMP 4.5)``)."""
    for line in torch.__config__.parallel_info().splitlines():
        if "OpenMP" in line or "thread pool" in line.lower():
            return line.strip()
    return "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures depend on: CPU, cores, threads, library versions, accelerator, load."""
    import optuna
    import ray

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads_default": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "parallel_backend": parallel_backend(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "ray": ray.__version__,
        "optuna": optuna.__version__,
        "os": f"{platform.system()} {platform.release()}",
        "cuda": torch.cuda.is_available(),
        "load_average": load_average(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def usable_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run a block with ``threads`` torch intra-op threads, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
