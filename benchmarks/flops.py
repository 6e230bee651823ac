"""Section 5: compute efficiency, the achieved FLOP/s of the step against the machine's conv peak.

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` over one unit of
work (convolutions, transposed convolutions and matrix products, forward and backward;
element-wise work is not counted, so the fractions are lower bounds). The peak is a
large ``conv2d`` forward (64 → 64 channels, 3×3, 128×128, batch 8) with the same
threads, timed in the same interleaved rounds as the steps.

Variants: the bare loop, the platform's supervised and mean-teacher steps (identity
augmentation), each in both memory layouts: contiguous (``train.channels_last=False``)
and channels-last (the platform's default since this section measured it; oneDNN prefers
it on CPU too). With ``compile`` the bare loop is also run through ``torch.compile`` (its
compile time is reported; minutes on 2 cores).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import Figure, Section, interleaved, torch_threads
from benchmarks.workloads import (BareStep, PlatformStep, StepShape, bare_step, draw_batches, experiment_config,
                                  phantom_data, synchronize)

COMPILED = "bare torch.compile"
CONTIGUOUS = {"train.channels_last": False}
CHANNELS_LAST = {"train.channels_last": True}


@dataclass(frozen=True)
class FlopSettings:
    """Sizes of the compute-efficiency section.

    Attributes:
        shape: the training problem.
        steps: steps per timed unit.
        peak_shape: ``(batch, channels, size)`` of the peak convolution.
        min_repeats, max_repeats, budget_s: interleaved rounds.
        compile: also time the bare loop under ``torch.compile``.
    """

    shape: StepShape = field(default_factory=StepShape)
    steps: int = 2
    peak_shape: tuple[int, int, int] = (8, 64, 128)
    min_repeats: int = 3
    max_repeats: int = 9
    budget_s: float = 30.0
    compile: bool = False

    @classmethod
    def quick(cls) -> "FlopSettings":
        """Small sizes for ``--quick``."""
        return cls(steps=1, min_repeats=2, max_repeats=3, budget_s=8.0)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data."""
        return {**asdict(self), "shape": self.shape.to_dict()}


class PeakConv:
    """A large 3×3 ``conv2d`` forward without gradients."""

    def __init__(self, batch: int, channels: int, size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.input = torch.randn(batch, channels, size, size, generator=generator)
        self.weight = torch.randn(channels, channels, 3, 3, generator=generator) * 0.05

    @torch.no_grad()
    def __call__(self) -> None:
        """One convolution."""
        F.conv2d(self.input, self.weight, padding=1)
        synchronize()


def count_flops(work: Callable[[], None]) -> int:
    """FLOPs that ``FlopCounterMode`` sees during one call of ``work``."""
    with FlopCounterMode(display=False) as counter:
        work()
    return int(counter.get_total_flops())


def compiled(step: BareStep) -> tuple[BareStep, float]:
    """A copy of a bare loop with a ``torch.compile``-d network, and the seconds its first call took."""
    lr, decay = step.optimizer.defaults["lr"], step.optimizer.defaults["weight_decay"]
    copy_step = BareStep(torch.compile(copy.deepcopy(step.network)), step.batches, step.steps, lr, decay)
    started = time.perf_counter()
    copy_step()
    return copy_step, time.perf_counter() - started


def run(settings: FlopSettings, workdir: Path) -> Section:
    """Count FLOPs per unit, time the units and the peak convolution, report the fractions."""
    section = Section("Compute efficiency (achieved FLOP/s vs conv peak)", settings.to_dict())
    with torch_threads(settings.shape.threads):
        variants = _variants(settings, workdir, section)
        flops = {name: count_flops(work) for name, work in variants.items() if name != COMPILED}
        if COMPILED in variants:
            flops[COMPILED] = flops["bare"]
        timings = interleaved(variants, settings.min_repeats, settings.max_repeats, settings.budget_s)
    for name, work_flops in flops.items():
        section.figures[f"GFLOP/s {name}"] = Figure(
            "GFLOP/s", [work_flops / s / 1e9 for s in timings.wall[name]], _help(name),
            [work_flops / s / 1e9 for s in timings.cpu[name] if s > 0] or None)
        section.extra[f"GFLOP per unit: {name}"] = work_flops / 1e9
    for name in flops:
        if name != "peak conv2d":
            section.add_ratio(f"{name} / peak", f"GFLOP/s {name}", "GFLOP/s peak conv2d",
                              "fraction of the machine's convolution peak (same threads)")
    per_image = flops["bare"] / (settings.steps * settings.shape.batch)
    section.extra["GFLOP per image (fwd+bwd, bare)"] = per_image / 1e9
    section.notes.append(f"Problem: {settings.shape.describe()}; peak conv2d {settings.peak_shape}; "
                         f"{timings.rounds} interleaved rounds.")
    return section


def _variants(settings: FlopSettings, workdir: Path, section: Section) -> dict[str, Callable[[], None]]:
    shape = settings.shape
    data = phantom_data(shape, workdir)
    labelled = draw_batches(data, shape, settings.steps, semi=False)
    contiguous = experiment_config(shape, "supervised", settings.steps, augment=False, overrides=CONTIGUOUS)
    layered = experiment_config(shape, "supervised", settings.steps, augment=False, overrides=CHANNELS_LAST)
    bare = bare_step(contiguous, data, labelled, settings.steps)
    variants: dict[str, Callable[[], None]] = {
        "peak conv2d": PeakConv(*settings.peak_shape),
        "bare": bare,
        "bare channels_last": bare_step(layered, data, labelled, settings.steps),
        "supervised": PlatformStep(contiguous, data, labelled),
        "supervised channels_last": PlatformStep(layered, data, labelled),
        "mean_teacher": PlatformStep(experiment_config(shape, "mean_teacher", settings.steps, augment=False,
                                                       overrides=CONTIGUOUS),
                                     data, draw_batches(data, shape, settings.steps, semi=True)),
        "mean_teacher channels_last": PlatformStep(experiment_config(shape, "mean_teacher", settings.steps,
                                                                     augment=False, overrides=CHANNELS_LAST),
                                                   data, draw_batches(data, shape, settings.steps, semi=True)),
    }
    if settings.compile:
        variants[COMPILED], seconds = compiled(bare)
        section.extra["torch.compile first call (s)"] = seconds
    return variants


def _help(name: str) -> str:
    return {"peak conv2d": "3x3 conv2d forward, the machine's practical peak",
            "bare": "bare loop: forward, Dice+CE, backward, AdamW",
            "bare channels_last": "bare loop, channels-last network and images",
            COMPILED: "bare loop, torch.compile-d network (FLOPs of the eager loop)",
            "supervised": "platform supervised step (identity augmentation)",
            "supervised channels_last": "platform supervised step, networks and images channels-last",
            "mean_teacher": "platform mean-teacher step (identity augmentation; counts the teacher forward)",
            "mean_teacher channels_last": "platform mean-teacher step, networks and images channels-last"}[name]
