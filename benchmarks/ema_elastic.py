"""Section 4: the EMA teacher update and elastic deformation.

- EMA: :meth:`EmaUpdater.update` (fused ``torch._foreach_lerp_``) on the mean teacher's
  networks, per update, as a fraction of the whole mean-teacher step (target ≤ 2 %), and
  against a naive per-parameter loop (``mul_`` + ``add_`` per tensor), interleaved.
- Elastic deformation: ``elasticdeform.torch.deform_grid`` (wrapped in
  :mod:`semiseg.components.elasticdeform_reference`: NumPy, one C call per sample, single
  thread) against the library's ``grid_sample`` implementation of the same deformation
  (:mod:`semiseg.components.elastic`), on the same displacement grids: their agreement
  (max |difference| on a smooth image, Dice of deformed label maps, identity for zero
  displacement), forward + backward time on probability maps (2D, and 3D at the default
  scale), and the transformation-consistency step (elastic T) as the library runs it
  against the same step with elasticdeform swapped in (the before/after of adopting it). CPU
  timings only: the GPU figures need a lent GPU machine, where ``grid_sample`` stays on
  the device and ``elasticdeform`` copies every sample to the host and back.

``elasticdeform`` is the optional ``reference`` extra (``scripts/setup.sh --test`` installs it);
without it the section measures the EMA only and says why the elastic comparison was skipped.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from semiseg.components import elastic as elastic_grid_sample
from benchmarks.common import Check, Section, interleaved, seconds_figure, torch_threads
from benchmarks.workloads import PlatformStep, StepShape, draw_batches, experiment_config, phantom_data
from semiseg.components import elasticdeform_reference as library_elastic
from semiseg.components.ema import EmaUpdater

EMA_FRACTION = 0.02
DICE_AGREEMENT = 0.98
MAX_DIFFERENCE = 1e-4
"""Agreement tolerance on a smooth image of unit amplitude (float32 rounding is ~1e-6)."""


@dataclass(frozen=True)
class EmaElasticSettings:
    """Sizes of the EMA and elastic section.

    Attributes:
        shape: the mean-teacher / transformation-consistency problem.
        steps: training steps per timed step unit.
        ema_updates: EMA updates per timed EMA unit.
        min_repeats, max_repeats, budget_s: interleaved rounds of each comparison.
        elastic_2d: ``[B, C, H, W]`` probability batch deformed in 2D.
        elastic_3d: ``[B, C, D, H, W]`` batch deformed in 3D (empty: skipped).
        sigma, points: displacement σ (voxels) and control points per axis
            (``transform_consistency``'s defaults).
    """

    shape: StepShape = field(default_factory=StepShape)
    steps: int = 2
    ema_updates: int = 50
    min_repeats: int = 3
    max_repeats: int = 9
    budget_s: float = 25.0
    elastic_2d: tuple[int, ...] = (8, 2, 64, 64)
    elastic_3d: tuple[int, ...] = (2, 2, 32, 32, 32)
    sigma: float = 4.0
    points: int = 3

    @classmethod
    def quick(cls) -> "EmaElasticSettings":
        """Small sizes for ``--quick``."""
        return cls(steps=1, ema_updates=20, min_repeats=2, max_repeats=3, budget_s=8.0, elastic_3d=())

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data."""
        return {**asdict(self), "shape": self.shape.to_dict()}


def run(settings: EmaElasticSettings, workdir: Path) -> Section:
    """EMA cost, elastic agreement, elastic timings and the transformation-consistency before/after."""
    section = Section("EMA update and elastic deformation", settings.to_dict())
    with torch_threads(settings.shape.threads):
        data = phantom_data(settings.shape, workdir)
        _ema(section, settings, data)
        if not elasticdeform_available():
            section.notes.append(f"elastic comparison skipped: {library_elastic.INSTALL_HINT}")
            return section
        _agreement(section, settings)
        _elastic_timing(section, settings, "2d", settings.elastic_2d)
        if settings.elastic_3d:
            _elastic_timing(section, settings, "3d", settings.elastic_3d)
        _transform_consistency(section, settings, data)
    section.notes.append("Elastic timings are CPU only; on a lent GPU run the same section to time grid_sample on "
                         "the device (elasticdeform always computes on the host).")
    return section


def elasticdeform_available() -> bool:
    """Whether ``elasticdeform`` (the optional ``reference`` extra) can be imported."""
    return importlib.util.find_spec("elasticdeform") is not None


class NaiveEma:
    """θ' ← αθ' + (1 − α)θ with one ``mul_`` and one ``add_`` per parameter and floating buffer."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module) -> None:
        pairs = list(zip(teacher.parameters(), student.parameters()))
        pairs += [(t, s) for t, s in zip(teacher.buffers(), student.buffers()) if t.is_floating_point()]
        self.pairs = pairs

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """One update."""
        for target, source in self.pairs:
            target.mul_(decay).add_(source, alpha=1.0 - decay)


def _repeat_update(updater: Any, count: int) -> Callable[[], None]:
    def work() -> None:
        for _ in range(count):
            updater.update(0.99)
    return work


def _ema(section: Section, settings: EmaElasticSettings, data: Any) -> None:
    shape = settings.shape
    step = PlatformStep(experiment_config(shape, "mean_teacher", settings.steps, augment=True), data,
                        draw_batches(data, shape, settings.steps, semi=True))
    teacher, student = step.method.frozen["teacher"], step.method.trained["student"]
    variants = {"mean_teacher step": step,
                "fused": _repeat_update(EmaUpdater(teacher, student), settings.ema_updates),
                "naive": _repeat_update(NaiveEma(teacher, student), settings.ema_updates)}
    timings = interleaved(variants, settings.min_repeats, settings.max_repeats, settings.budget_s)
    section.figures["mean_teacher step"] = seconds_figure(timings, "mean_teacher step", 1e3 / settings.steps, "ms",
                                                          "one platform step, default augmentation")
    for name, what in (("fused", "EmaUpdater.update (torch._foreach_lerp_)"),
                       ("naive", "per-parameter mul_ + add_ loop")):
        section.figures[f"EMA {name}"] = seconds_figure(timings, name, 1e3 / settings.ema_updates, "ms",
                                                        f"one update: {what}")
    fraction = section.add_ratio("EMA fused / mean_teacher step", "EMA fused", "mean_teacher step",
                                 "share of the step spent in the teacher update")
    section.add_ratio("EMA naive / fused", "EMA naive", "EMA fused", "speed-up of the fused update")
    section.checks.append(Check("EMA update share of the mean_teacher step", fraction, EMA_FRACTION, "<="))
    parameters = sum(p.numel() for p in student.parameters())
    tensors = len(list(student.parameters())) + len([b for b in student.buffers() if b.is_floating_point()])
    section.extra["EMA: parameters"] = parameters
    section.extra["EMA: tensors per update"] = tensors


def smooth_image(shape: tuple[int, ...], channels: int = 1) -> torch.Tensor:
    """``[1, channels, *shape]`` sum of low-frequency sinusoids with amplitude about 1."""
    axes = torch.meshgrid(*[torch.linspace(0.0, 1.0, size) for size in shape], indexing="ij")
    image = sum(torch.sin(2.5 * (k + 1) * axis + k) for k, axis in enumerate(axes)) / len(shape)
    return image.expand(1, channels, *shape).contiguous()


def label_dice(first: torch.Tensor, second: torch.Tensor) -> float:
    """Mean Dice over the foreground classes present in either label map."""
    scores = []
    for label in sorted(set(torch.unique(torch.cat([first.flatten(), second.flatten()])).tolist()) - {0}):
        a, b = first == label, second == label
        scores.append(2.0 * (a & b).sum().item() / max(1, a.sum().item() + b.sum().item()))
    return sum(scores) / len(scores) if scores else 1.0


def agreement(shape: tuple[int, ...], batch: int, sigma: float, points: int, seed: int = 0) -> dict[str, float]:
    """Compare both implementations on the same random displacements.

    Returns:
        ``max_abs_difference`` on a smooth image, ``label_dice`` of deformed label maps
        (three classes), ``identity_max_abs`` of the ``grid_sample`` version for zero
        displacement, and ``mask_disagreement`` (fraction of voxels whose valid mask differs).
    """
    generator = torch.Generator().manual_seed(seed)
    image = smooth_image(shape, 2).expand(batch, -1, *shape).contiguous()
    displacement = library_elastic.sample_displacement(batch, len(shape), sigma, points, generator)
    reference = library_elastic.elastic_deform(image, displacement)
    ours = elastic_grid_sample.elastic_deform(image, displacement)
    labels = (image[:, 0] > 0.3).long() + (image[:, 0] > 0.7).long()
    identity = elastic_grid_sample.elastic_deform(image, torch.zeros_like(displacement))
    masks = (library_elastic.deformed_valid_mask(image, displacement)
             != elastic_grid_sample.deformed_valid_mask(image, displacement))
    return {"max_abs_difference": (reference - ours).abs().max().item(),
            "label_dice": label_dice(library_elastic.elastic_deform_labels(labels, displacement),
                                     elastic_grid_sample.elastic_deform_labels(labels, displacement)),
            "identity_max_abs": (identity - image).abs().max().item(),
            "mask_disagreement": masks.float().mean().item()}


def _agreement(section: Section, settings: EmaElasticSettings) -> None:
    cases = {"2d": settings.elastic_2d, **({"3d": settings.elastic_3d} if settings.elastic_3d else {})}
    for name, dims in cases.items():
        result = agreement(tuple(dims[2:]), dims[0], settings.sigma, settings.points)
        for key, value in result.items():
            section.extra[f"elastic {name}: {key}"] = value
        section.checks.append(Check(f"elastic {name}: max abs difference grid_sample vs elasticdeform (smooth image)",
                                    result["max_abs_difference"], MAX_DIFFERENCE, "<="))
        section.checks.append(Check(f"elastic {name}: Dice of deformed label maps", result["label_dice"],
                                    DICE_AGREEMENT, ">="))


def _deform_backward(deform: Any, probs: torch.Tensor, displacement: torch.Tensor) -> Callable[[], None]:
    def work() -> None:
        source = probs.detach().requires_grad_(True)
        deform(source, displacement).square().sum().backward()
    return work


def _elastic_timing(section: Section, settings: EmaElasticSettings, name: str, dims: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(1)
    probs = torch.rand(dims, generator=generator).softmax(dim=1)
    displacement = library_elastic.sample_displacement(dims[0], len(dims) - 2, settings.sigma, settings.points,
                                                       generator)
    variants = {"elasticdeform": _deform_backward(library_elastic.elastic_deform, probs, displacement),
                "grid_sample": _deform_backward(elastic_grid_sample.elastic_deform, probs, displacement)}
    timings = interleaved(variants, settings.min_repeats, settings.max_repeats, settings.budget_s / 2)
    for variant in variants:
        section.figures[f"elastic {name} {variant}"] = seconds_figure(
            timings, variant, 1e3, "ms", f"forward + backward on {list(dims)} probabilities")
    section.add_ratio(f"elastic {name}: elasticdeform / grid_sample", f"elastic {name} elasticdeform",
                      f"elastic {name} grid_sample", "speed-up of the grid_sample implementation")


@contextlib.contextmanager
def elasticdeform_in_transform_consistency() -> Iterator[None]:
    """Swap the elasticdeform reference into ``transform_consistency`` for the duration of a block
    (the library's own implementation is the grid_sample one)."""
    import semiseg.methods.transform_consistency as module

    names = ("elastic_deform", "elastic_deform_labels", "deformed_valid_mask")
    saved = {name: getattr(module, name) for name in names}
    try:
        for name in names:
            setattr(module, name, getattr(library_elastic, name))
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


class WithElasticdeform:
    """Run a unit of work inside :func:`elasticdeform_in_transform_consistency`."""

    def __init__(self, work: Any) -> None:
        self.work = work

    def __call__(self) -> None:
        """Run the work with elasticdeform's deformation."""
        with elasticdeform_in_transform_consistency():
            self.work()


def _transform_consistency(section: Section, settings: EmaElasticSettings, data: Any) -> None:
    shape = settings.shape

    def step() -> PlatformStep:
        return PlatformStep(experiment_config(shape, "transform_consistency", settings.steps, augment=True),
                            data, draw_batches(data, shape, settings.steps, semi=True))

    variants = {"elasticdeform": WithElasticdeform(step()), "grid_sample": step()}
    timings = interleaved(variants, settings.min_repeats, settings.max_repeats, settings.budget_s)
    for variant in variants:
        section.figures[f"transform_consistency step ({variant})"] = seconds_figure(
            timings, variant, 1e3 / settings.steps, "ms", "platform step, elastic T, default augmentation")
    section.add_ratio("transform_consistency: elasticdeform / grid_sample step time",
                      "transform_consistency step (elasticdeform)", "transform_consistency step (grid_sample)",
                      "step speed-up of the library's grid_sample deformation over elasticdeform's")
