"""Section 1: training-step throughput of every method against a bare PyTorch loop.

All variants use the same U-Net (``BuildContext.build_network``), the same pre-drawn
phantom batches, the same number of images per step and the same threads, and they are
timed in interleaved rounds. Augmentation ranges are zero for the like-for-like
comparison (the platform still runs its warps, which are then identities); the
augmented supervised and mean-teacher steps are reported separately.

Costs are per image pushed through the trained network(s): a semi-supervised step on
``batch`` images (half labelled) is compared with a supervised step on ``batch``
labelled images. Theoretical costs relative to the supervised step, with a forward pass
costing a fraction f of a forward + backward + optimiser step (f ≈ 1/3):

- mean teacher: one teacher forward over the batch, 1 + f;
- UA-MT: 1 + (1 + T) teacher forwards (T Monte-Carlo passes) over the fraction u of the
  batch the consistency covers (u = 1/2 with the default ``cons_on = unlabelled``),
  1 + (1 + T)·f·u;
- CPS: two networks, 2.

Two attribution variants: the supervised step without gradient clipping, and, in a
separate interleaved pair (idle OpenMP threads disturb whatever runs next), the bare
loop with one thread against all cores: below a speed-up equal to the core count,
one-thread trials side by side use the machine better than one multi-thread trial.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import Check, Section, interleaved, rate_figure, torch_threads, usable_cores
from benchmarks.workloads import (ForwardOnly, PlatformStep, StepShape, WithThreads, bare_step, draw_batches,
                                  experiment_config, phantom_data)
from semiseg.methods import method_defaults, method_names

FORWARD_FRACTION = 1.0 / 3.0
ALLOWANCE = 1.10
"""Theoretical ratios get 10 % for the losses, the (identity) warps and the EMA update."""
SUPERVISED_VS_BARE = 0.95
MEAN_TEACHER_VS_SUPERVISED = 1.5
AUGMENTED = ("supervised", "mean_teacher")
NO_CLIP = "supervised (no grad clip)"


@dataclass(frozen=True)
class StepSettings:
    """Sizes of the step section.

    Attributes:
        shape: the problem (network, images, batch, threads).
        steps: optimiser steps per timed unit.
        min_repeats, max_repeats: interleaved timed rounds (at least, at most).
        budget_s: time after which no new round starts once ``min_repeats`` are done.
        warmup: untimed rounds first.
        methods: methods to time (empty: every registered one).
        compare_threads: threads of the thread-scaling pair's second bare loop (default: all cores).
    """

    shape: StepShape = field(default_factory=StepShape)
    steps: int = 2
    min_repeats: int = 3
    max_repeats: int = 9
    budget_s: float = 150.0
    warmup: int = 1
    methods: tuple[str, ...] = ()
    compare_threads: int = field(default_factory=lambda: usable_cores())

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data."""
        return {**asdict(self), "shape": self.shape.to_dict()}


def theoretical_costs(batch: int, forward_fraction: float) -> dict[str, float]:
    """Cost of a step relative to the supervised step, per method with a known model."""
    unlabelled = (batch - batch // 2) / batch
    passes = 1 + int(method_defaults("ua_mean_teacher")["mc_passes"])
    return {"mean_teacher": 1.0 + forward_fraction,
            "ua_mean_teacher": 1.0 + passes * forward_fraction * unlabelled,
            "cross_pseudo_supervision": 2.0}


def _variants(settings: StepSettings, workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The compared steps, and the thread-scaling pair (timed apart: idle OpenMP threads disturb neighbours)."""
    shape = settings.shape
    data = phantom_data(shape, workdir)
    labelled = draw_batches(data, shape, settings.steps, semi=False)
    mixed = draw_batches(data, shape, settings.steps, semi=True)
    methods = settings.methods or tuple(method_names())
    supervised_cfg = experiment_config(shape, "supervised", settings.steps, augment=False)
    variants: dict[str, Any] = {"bare": bare_step(supervised_cfg, data, labelled, settings.steps)}
    variants["forward_only"] = ForwardOnly(copy.deepcopy(variants["bare"].network), variants["bare"].batches,
                                           settings.steps)
    for method in methods:
        batches = labelled if method == "supervised" else mixed
        variants[method] = PlatformStep(experiment_config(shape, method, settings.steps, augment=False),
                                        data, batches)
    if "supervised" in methods:
        variants[NO_CLIP] = PlatformStep(experiment_config(shape, "supervised", settings.steps, augment=False,
                                                           overrides={"optim.grad_clip": 0.0}), data, labelled)
    for method in AUGMENTED:
        if method in methods:
            batches = labelled if method == "supervised" else mixed
            variants[f"{method}+augment"] = PlatformStep(
                experiment_config(shape, method, settings.steps, augment=True), data, batches)
    scaling = {}
    if settings.compare_threads != shape.threads:
        scaling = {f"bare@{shape.threads}thread": bare_step(supervised_cfg, data, labelled, settings.steps),
                   f"bare@{settings.compare_threads}threads": WithThreads(
                       bare_step(supervised_cfg, data, labelled, settings.steps), settings.compare_threads)}
    return variants, scaling


def supervised_layout_is_channels_last(shape: Any, steps: int) -> bool:
    """Whether the platform's default configuration trains channels-last (``train.channels_last``)."""
    return experiment_config(shape, "supervised", steps, augment=False).train.channels_last


def run(settings: StepSettings, workdir: Path) -> Section:
    """Time every variant and compare the costs with the bare loop and the theory."""
    shape = settings.shape
    section = Section("Step throughput (samples/s)", settings.to_dict())
    with torch_threads(shape.threads):
        variants, scaling = _variants(settings, workdir)
        timings = interleaved(variants, settings.min_repeats, settings.max_repeats, settings.budget_s,
                              settings.warmup)
        scaled = interleaved(scaling, settings.min_repeats, settings.min_repeats, warmup=1) if scaling else None
    images = shape.batch * settings.steps
    for name in variants:
        section.figures[f"throughput/{name}"] = rate_figure(timings, name, images, "samples/s", _help(name))
    _ratios(section, [name for name in variants if name not in ("bare", "forward_only")])
    if scaled is not None:
        _thread_scaling(section, scaled, settings, images)
    _checks(section, shape.batch)
    section.notes.append(f"Problem: {shape.describe()}; {settings.steps} step(s) per unit, "
                         f"{timings.rounds} interleaved rounds.")
    section.notes.append("Costs are per image through the trained network(s); the supervised step and the bare "
                         "loop get the whole batch labelled, semi-supervised steps half labelled, half unlabelled.")
    layout = "channels-last" if supervised_layout_is_channels_last(shape, settings.steps) else "contiguous"
    section.notes.append(f"Every variant, the bare loop included, runs in the platform's default memory layout "
                         f"({layout}); the flops section compares the two layouts.")
    return section


def _thread_scaling(section: Section, scaled: Any, settings: StepSettings, images: int) -> None:
    one, many = list(scaled.wall)
    for name in (one, many):
        section.figures[f"throughput/{name}"] = rate_figure(scaled, name, images, "samples/s", _help(name))
    threads, base = settings.compare_threads, settings.shape.threads
    section.add_ratio(f"thread speed-up {threads} vs {base}", f"throughput/{many}", f"throughput/{one}",
                      f"bare-loop throughput with {threads} threads relative to {base} (own interleaved pair); "
                      f"below {threads / base:.0f}, {threads} one-thread trials beat one {threads}-thread trial")


def _help(name: str) -> str:
    if name == "bare":
        return "hand-written loop: forward, Dice+CE, backward, AdamW (no clipping, no augmentation)"
    if name.startswith("bare@"):
        return "bare loop in a separate interleaved pair: one trial's threads vs all cores"
    if name == NO_CLIP:
        return "platform supervised step with optim.grad_clip = 0 (attributes the clipping)"
    if name == "forward_only":
        return "no-grad eval-mode forward of the same network (a teacher pass)"
    if name.endswith("+augment"):
        return "platform step with the default augmentation ranges"
    return "platform step (train_epoch: training_step, backward_and_step, after_step), identity augmentation"


def _ratios(section: Section, platform: list[str]) -> None:
    section.add_ratio("supervised / bare", "throughput/supervised", "throughput/bare",
                      "throughput of the platform's supervised step relative to the bare loop")
    section.add_ratio("forward fraction f", "throughput/bare", "throughput/forward_only",
                      "cost of a no-grad forward relative to a bare forward+backward+AdamW step")
    for name in platform:
        if name != "supervised":
            section.add_ratio(f"cost {name} / supervised", "throughput/supervised", f"throughput/{name}",
                              "cost per image relative to the platform's supervised step")


def _checks(section: Section, batch: int) -> None:
    """Verdicts on the ratio of the best rounds (the least disturbed; see ``Figure.best``).

    The ratio of medians and the per-round median are kept in each check's note: on a
    shared machine they carry the other tenants' load as well as the code's cost.
    """
    def measured(name: str) -> tuple[float, str]:
        record = section.ratios[name]
        return record["best_value"], (f"of medians {record['value']:.3g}, "
                                      f"per-round median {record['per_round']['median']:.3g}")

    value, spread = measured("supervised / bare")
    section.checks.append(Check("supervised step vs bare loop (throughput, best rounds)", value,
                                SUPERVISED_VS_BARE, ">=", spread))
    if "cost mean_teacher / supervised" in section.ratios:
        value, spread = measured("cost mean_teacher / supervised")
        section.checks.append(Check("mean_teacher cost vs supervised (best rounds)", value,
                                    MEAN_TEACHER_VS_SUPERVISED, "<=", spread))
    measured_f = section.ratios["forward fraction f"]["best_value"]
    assumed = theoretical_costs(batch, FORWARD_FRACTION)
    predicted = theoretical_costs(batch, measured_f)
    for method in ("ua_mean_teacher", "cross_pseudo_supervision"):
        if f"cost {method} / supervised" in section.ratios:
            value, spread = measured(f"cost {method} / supervised")
            section.checks.append(Check(
                f"{method} cost vs supervised (best rounds)", value, assumed[method] * ALLOWANCE, "<=",
                f"theory {assumed[method]:.2f} with f = 1/3 (+10 %); {predicted[method]:.2f} with measured "
                f"f = {measured_f:.2f}; {spread}"))
    for method, value in predicted.items():
        section.extra[f"predicted cost {method} (measured f)"] = value
        section.extra[f"theoretical cost {method} (f = 1/3)"] = assumed[method]
