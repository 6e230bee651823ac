"""Section 3: the data path, against what the training step consumes.

- Loader: images per second drawn by :meth:`MixedBatchSampler.epoch` from in-memory
  slices, and with the unlabelled half streamed from the Parquet cache through the shuffle
  buffer (``data.loader=stream``, :mod:`semiseg.data.stream`), against the images per
  second the platform's supervised step (the fastest consumer) and mean-teacher step
  consume, interleaved in the same rounds. Target: each loader at least 5× faster.
- Preprocessing: cases per second of :func:`build_cache` on a generated phantom into a
  fresh cache root each time (load, orient, normalise, write Parquet), with and without
  resampling; then reading it back (:meth:`CachedDataset.iter_slices`, rows/s) and a
  trial's data preparation from the built cache (:func:`prepare_split`, seconds).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import Check, Section, interleaved, rate_figure, seconds_figure, torch_threads
from benchmarks.workloads import PlatformStep, StepShape, draw_batches, experiment_config, phantom_data, sampler
from semiseg.data.cache import CachedDataset, build_cache
from semiseg.data.phantom import generate_phantom
from semiseg.data.prepared import prepare_split
from semiseg.data.preprocess import PreprocessSettings

LOADER_VS_STEP = 5.0
RESAMPLED = PreprocessSettings(target_spacing=(1.0, 1.0, 1.5), crop_to_body=True)


@dataclass(frozen=True)
class DataSettings:
    """Sizes of the data section.

    Attributes:
        shape: the training problem (images, batch, network for the consuming step).
        loader_batches: batches drawn per timed loader unit.
        steps: training steps per timed step unit.
        min_repeats, max_repeats, budget_s: interleaved rounds of the loader/step comparison.
        phantom_cases, phantom_shape: the phantom preprocessed by ``build_cache``.
        cache_repeats: fresh cache builds per preprocessing variant.
    """

    shape: StepShape = field(default_factory=StepShape)
    loader_batches: int = 200
    steps: int = 2
    min_repeats: int = 3
    max_repeats: int = 7
    budget_s: float = 30.0
    phantom_cases: int = 16
    phantom_shape: tuple[int, int, int] = (96, 96, 12)
    cache_repeats: int = 3

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data."""
        return {**asdict(self), "shape": self.shape.to_dict()}


class LoaderEpoch:
    """Draw ``batches`` mixed batches from the loop's sampler (a new epoch seed each call)."""

    def __init__(self, data: Any, shape: StepShape, batches: int) -> None:
        self.sampler = sampler(data, shape.batch // 2, shape.batch - shape.batch // 2)
        self.batches = batches
        self.calls = 0

    def __call__(self) -> None:
        """Iterate one epoch of ``batches`` batches."""
        self.calls += 1
        for _ in self.sampler.epoch(self.calls, self.batches):
            pass


def run(settings: DataSettings, workdir: Path) -> Section:
    """Measure the loader against the step, then preprocessing and cache reads."""
    section = Section("Data: loader and preprocessing", settings.to_dict())
    with torch_threads(settings.shape.threads):
        _loader(section, settings, workdir)
        _preprocessing(section, settings, workdir)
    return section


def _loader(section: Section, settings: DataSettings, workdir: Path) -> None:
    shape = settings.shape
    data = phantom_data(shape, workdir)
    variants = {
        "loader": LoaderEpoch(data, shape, settings.loader_batches),
        "loader/stream": LoaderEpoch(phantom_data(shape, workdir, loader="stream"), shape, settings.loader_batches),
        "step/supervised": PlatformStep(experiment_config(shape, "supervised", settings.steps, augment=True), data,
                                        draw_batches(data, shape, settings.steps, semi=False)),
        "step/mean_teacher": PlatformStep(experiment_config(shape, "mean_teacher", settings.steps, augment=True),
                                          data, draw_batches(data, shape, settings.steps, semi=True)),
    }
    timings = interleaved(variants, settings.min_repeats, settings.max_repeats, settings.budget_s)
    section.figures["loader samples/s"] = rate_figure(timings, "loader", settings.loader_batches * shape.batch,
                                                      "samples/s", "MixedBatchSampler.epoch, half labelled")
    section.figures["streamed loader samples/s"] = rate_figure(
        timings, "loader/stream", settings.loader_batches * shape.batch, "samples/s",
        "the unlabelled half streamed from Parquet through a 256-slice shuffle buffer")
    for method in ("supervised", "mean_teacher"):
        section.figures[f"{method} step samples/s"] = rate_figure(
            timings, f"step/{method}", settings.steps * shape.batch, "samples/s",
            "images the platform's step consumes (default augmentation)")
        section.add_ratio(f"loader / {method} step", "loader samples/s", f"{method} step samples/s",
                          "how many times faster the loader draws images than the step consumes them")
        section.add_ratio(f"streamed loader / {method} step", "streamed loader samples/s",
                          f"{method} step samples/s", "the same with the unlabelled pool streamed")
    section.checks.append(Check("loader vs supervised step (fastest consumer)",
                                section.ratios["loader / supervised step"]["value"], LOADER_VS_STEP, ">="))
    section.checks.append(Check("streamed loader vs supervised step",
                                section.ratios["streamed loader / supervised step"]["value"], LOADER_VS_STEP, ">="))
    section.notes.append(f"Loader and steps on {shape.describe()}; {timings.rounds} interleaved rounds.")


def _preprocessing(section: Section, settings: DataSettings, workdir: Path) -> None:
    x, y, z = settings.phantom_shape
    layout = generate_phantom(workdir / f"phantom-pre-{x}x{y}x{z}-{settings.phantom_cases}",
                              num_training=settings.phantom_cases, num_test=0, shape=settings.phantom_shape, seed=1)
    rounds = _cache_builds(section, settings, layout, workdir)
    _cache_reads(section, settings, layout, workdir / "cache-read")
    section.notes.append(f"Preprocessing: {settings.phantom_cases} phantom cases of {x}x{y}x{z} voxels, "
                         f"{rounds} fresh builds per variant.")


def _cache_builds(section: Section, settings: DataSettings, layout: Any, workdir: Path) -> int:
    """Time ``build_cache`` into a fresh root per call, as stored and resampled; return the rounds."""
    builds = {"as stored": PreprocessSettings(), "resampled 1x1x1.5 mm + crop": RESAMPLED}
    roots: list[Path] = []

    def builder(preprocess: PreprocessSettings) -> Callable[[], None]:
        def build() -> None:
            roots.append(Path(tempfile.mkdtemp(prefix="cache-", dir=workdir)))
            build_cache(layout, preprocess, roots[-1])
        return build

    timings = interleaved({name: builder(p) for name, p in builds.items()}, settings.cache_repeats, warmup=0)
    x, y, z = settings.phantom_shape
    for name in builds:
        section.figures[f"build_cache {name} cases/s"] = rate_figure(
            timings, name, settings.phantom_cases, "cases/s", f"fresh cache root, {x}x{y}x{z} phantom")
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
    return timings.rounds


def _cache_reads(section: Section, settings: DataSettings, layout: Any, root: Path) -> None:
    """Time reading every slice back, and a trial's ``prepare_split``, from one built cache."""
    cache = build_cache(layout, PreprocessSettings(), root)
    reads = interleaved({"iter_slices": lambda: _read_all(cache.path),
                         "prepare_split": lambda: _prepare(layout, root, settings.phantom_cases)},
                        settings.cache_repeats)
    section.figures["cache read rows/s"] = rate_figure(reads, "iter_slices", cache.num_rows, "rows/s",
                                                       "CachedDataset.iter_slices over every slice")
    section.figures["prepare_split from cache"] = seconds_figure(
        reads, "prepare_split", help="a trial's data preparation when the cache exists")


def _read_all(path: Path) -> None:
    for _ in CachedDataset(path).iter_slices():
        pass


def _prepare(layout: Any, root: Path, cases: int) -> None:
    """The loop's data preparation: 1 validation and 1 test case, half the rest labelled."""
    prepare_split(layout, num_labelled=max(1, (cases - 2) // 2), num_validation=1, num_test=1, split_seed=0,
                  dims=2, cache_root=root)

