"""Cases of one split, preprocessed and arranged for training and evaluation.

Training uses 2D slices (``data.dims = 2``, slices along the last axis) or whole 3D
volumes (``data.dims = 3``); validation and test always run on whole cases so that
metrics are per case in millimetres.

Cases go through :func:`semiseg.data.preprocess.preprocess_case` (canonical
orientation, optional crop and resampling, intensity normalisation), either in
memory or through the Parquet cache of :mod:`semiseg.data.cache`. Evaluation
therefore happens in the preprocessed space: the predicted and reference label
maps are compared on the resampled grid, and distances (HD95, ASD) are in mm of
the preprocessed spacing (``EvalCase.spacing``), not on the original grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semiseg.data.cache import CachedDataset, Progress, build_cache
from semiseg.data.errors import DatasetError
from semiseg.data.dataset import DatasetLayout
from semiseg.data.formats import read_dataset
from semiseg.data.padding import channel_minimum, pad_centred
from semiseg.data.preprocess import PreprocessedCase, PreprocessSettings, normalise, preprocess_case
from semiseg.data.splits import Split, select_split
from semiseg.data.stream import LazyCases, StreamSpec, unlabelled_bytes
from semiseg.data.validation import load_case

LOADERS = ("auto", "memory", "stream")


@dataclass(frozen=True)
class EvalCase:
    """A whole case for evaluation: image ``[C, X, Y, Z]``, label ``[X, Y, Z]``, spacing in mm."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


@dataclass
class PreparedData:
    """Arrays of every role of a split.

    Attributes:
        labelled_images: ``[N, C, *spatial]`` float32 training samples with labels.
        labelled_labels: ``[N, *spatial]`` int64.
        unlabelled_images: ``[M, C, *spatial]`` float32 (labels hidden or absent); empty
            when ``unlabelled_stream`` is set.
        validation, test: whole cases for evaluation (read one at a time when streaming).
        class_ids: label values including background (0).
        in_channels: image channels.
        split: the case-level split these arrays came from.
        unlabelled_stream: where the unlabelled samples are streamed from, or None.
        training_spacing: median voxel size in mm (X, Y, Z) of the split's labelled
            training cases after preprocessing: the target spacing when
            ``data.target_spacing`` is set; otherwise cases keep their own spacing and this
            is the per-axis median of theirs (the training samples are on their grids). The
            augmentation rotates in millimetres with it.
        labelled_positions, unlabelled_positions: ``[N]`` and ``[M]`` float32, where each training
            sample lies in its volume: a 2D slice's relative position along the slicing axis
            (``slice_index / (slices - 1)``, 0 for a single slice; Chaitanya et al.'s partitions
            of a volume), 0.5 for a 3D volume (its centre). None (the default) reads as zeros;
            :meth:`positions` fills it in. The streamed pool names its rows' positions itself.
        labels: label name to class id, as ``dataset.json`` declares them.
        preprocessing: the settings the cases were preprocessed with (what a prediction of a
            new scan must repeat), or None where unknown.
    """

    labelled_images: np.ndarray
    labelled_labels: np.ndarray
    unlabelled_images: np.ndarray
    validation: list[EvalCase]
    test: list[EvalCase]
    class_ids: tuple[int, ...]
    in_channels: int
    split: Split
    unlabelled_stream: StreamSpec | None = None
    training_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    labelled_positions: np.ndarray | None = None
    unlabelled_positions: np.ndarray | None = None
    labels: dict[str, int] = dataclasses.field(default_factory=dict)
    preprocessing: PreprocessSettings | None = None

    @property
    def label_names(self) -> dict[int, str]:
        """Class id to its name in ``dataset.json`` (the id as text where none is declared)."""
        names = {int(value): str(name) for name, value in self.labels.items()}
        return {class_id: names.get(class_id, str(class_id)) for class_id in self.class_ids}

    def positions(self, role: str) -> np.ndarray:
        """``labelled_positions`` or ``unlabelled_positions`` (``role`` ``labelled``/``unlabelled``), zeros when unset.

        Raises:
            ValueError: an unknown role.
        """
        if role not in ("labelled", "unlabelled"):
            raise ValueError(f"role must be 'labelled' or 'unlabelled', got {role!r}")
        stored = getattr(self, f"{role}_positions")
        return np.zeros(len(getattr(self, f"{role}_images")), np.float32) if stored is None else stored

    @property
    def num_unlabelled(self) -> int:
        """Unlabelled training samples (slices or volumes), in memory or streamed."""
        if self.unlabelled_stream is not None:
            return CachedDataset(self.unlabelled_stream.cache).num_rows(self.unlabelled_stream.case_ids)
        return len(self.unlabelled_images)

    @property
    def num_classes(self) -> int:
        """Number of output classes (background included)."""
        return len(self.class_ids)


def normalise_image(image: np.ndarray) -> np.ndarray:
    """Z-score each channel of ``image`` ``[C, X, Y, Z]`` over all its voxels.

    Args:
        image: The image.

    Returns:
        float32 image of the same shape.

    Raises:
        ValueError: a channel is constant (its standard deviation is 0).
    """
    return normalise(image, "zscore")


def to_slices(volume: np.ndarray) -> np.ndarray:
    """``[C, X, Y, Z]`` → ``[Z, C, X, Y]`` (or ``[X, Y, Z]`` → ``[Z, X, Y]``)."""
    return np.ascontiguousarray(np.moveaxis(volume, -1, 0))


def sample_positions(volumes: Sequence[np.ndarray], dims: int) -> np.ndarray:
    """Relative position of every training sample :func:`_training_samples` makes of ``volumes``.

    Args:
        volumes: ``[C, X, Y, Z]`` (or ``[X, Y, Z]``) arrays, in the order their samples are stacked.
        dims: 2 (one sample per slice along the last axis) or 3 (one per volume).

    Returns:
        ``[samples]`` float32: ``z / (Z - 1)`` for slice ``z`` of ``Z`` (0 when ``Z`` is 1); 0.5 per volume.
    """
    if dims == 3:
        return np.full(len(volumes), 0.5, np.float32)
    parts = [np.arange(v.shape[-1]) / (v.shape[-1] - 1) if v.shape[-1] > 1 else np.zeros(1) for v in volumes]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def prepare_split(layout: DatasetLayout, *, num_labelled: int, num_validation: int, num_test: int,
                  split_seed: int, dims: int, cache_root: str | Path | None = None,
                  settings: PreprocessSettings | None = None, progress: Progress | None = None,
                  loader: str = "memory", memory_budget_mb: float = 2048.0,
                  stream_buffer_rows: int = 256, split_index: int = 0, splits_file: str = "") -> PreparedData:
    """Split ``layout`` by case and load every role, preprocessed.

    Training samples of different in-plane (2D) or volume (3D) shapes are padded
    to the largest one, centred: images with each case's per-channel minimum,
    labels with background (0). Evaluation cases keep their own shapes.

    Args:
        layout: a dataset read by :func:`semiseg.data.formats.read_dataset`.
        num_labelled, num_validation, num_test: cases per role (the rest is unlabelled).
        split_seed: seed of the case-level split.
        dims: 2 (training on slices) or 3 (training on volumes); overrides ``settings.dims``.
        cache_root: where the Parquet cache of the whole dataset is built once
            (or reused); None preprocesses the split's cases in memory.
        settings: preprocessing; None is ``PreprocessSettings()`` (canonical
            orientation, no resampling or crop, z-score over all voxels).
        progress: ``progress(done, total, case_id)`` while a cache is built.
        loader: ``memory`` loads every role; ``stream`` keeps the labelled samples in
            memory, streams the unlabelled ones from the cache (:mod:`semiseg.data.stream`)
            and reads evaluation cases one at a time; ``auto`` streams when the unlabelled
            samples would take more than ``memory_budget_mb``. Streaming needs ``cache_root``.
        memory_budget_mb: the ``auto`` threshold.
        stream_buffer_rows: unlabelled samples held at once per worker when streaming.
        split_index: which split (:func:`semiseg.data.splits.select_split`; 0 is the seed's split).
        splits_file: a ``splits_final.json`` to take the split from, or "" to draw it.

    Returns:
        The prepared arrays; ``EvalCase.spacing`` is the preprocessed spacing in mm.

    Raises:
        DatasetError: a file cannot be used, or the budget exceeds the labelled cases.
    """
    if dims not in (2, 3):
        raise DatasetError.single("data.dims", f"must be 2 or 3, got {dims}")
    split = select_split(layout.labelled_ids, layout.unlabelled_ids, num_labelled=num_labelled,
                         num_validation=num_validation, num_test=num_test, seed=split_seed, index=split_index,
                         splits_file=splits_file)
    settings = dataclasses.replace(settings or PreprocessSettings(), dims=dims)
    _check_loader(loader)
    if cache_root is not None:
        dataset = CachedDataset(build_cache(layout, settings, Path(cache_root), progress=progress).path)
        return _split_from_cache(dataset, split, dims, loader, memory_budget_mb, stream_buffer_rows)
    if loader == "stream":
        raise DatasetError.single("data.loader", "streaming reads the preprocessed cache; give a cache folder")

    def load(case_ids: Sequence[str]) -> list[PreprocessedCase]:
        return [_preprocess_in_memory(layout, case_id, settings) for case_id in case_ids]
    return _loaded_split(load, split, dims, tuple(layout.class_ids), layout.num_channels, dict(layout.labels),
                         settings)


def prepare_cached_split(dataset: CachedDataset, *, num_labelled: int, num_validation: int, num_test: int,
                         split_seed: int, loader: str = "memory", memory_budget_mb: float = 2048.0,
                         stream_buffer_rows: int = 256, split_index: int = 0, splits_file: str = "") -> PreparedData:
    """Split a built cache by case and load every role, without reading the dataset folder.

    What :func:`prepare_split` does with ``cache_root`` once the cache is built: the cases,
    their labels, the declared labels and channels come from the cache's manifest, so
    nothing of the dataset is listed, read or fingerprinted again. The training samples are
    those of the cache's settings (``dims`` among them).

    Args:
        dataset: A complete cache (e.g. the one the study driver built and handed over).
        num_labelled, num_validation, num_test, split_seed, loader, memory_budget_mb,
            stream_buffer_rows, split_index, splits_file: as for :func:`prepare_split`.

    Returns:
        The prepared arrays, the same as :func:`prepare_split` gives for the cache's dataset.

    Raises:
        DatasetError: the budget exceeds the labelled cases, a bad loader, or a cache
            whose rows do not match its manifest.
    """
    split = select_split(dataset.labelled_ids, dataset.unlabelled_ids, num_labelled=num_labelled,
                         num_validation=num_validation, num_test=num_test, seed=split_seed, index=split_index,
                         splits_file=splits_file)
    _check_loader(loader)
    return _split_from_cache(dataset, split, dataset.settings.dims, loader, memory_budget_mb, stream_buffer_rows)


def _check_loader(loader: str) -> None:
    if loader not in LOADERS:
        raise DatasetError.single("data.loader", f"must be one of {', '.join(LOADERS)}, got {loader!r}")


def _split_from_cache(dataset: CachedDataset, split: Split, dims: int, loader: str, memory_budget_mb: float,
                      stream_buffer_rows: int) -> PreparedData:
    """Every role of ``split`` from a cache: loaded, or the unlabelled pool streamed (``loader``)."""
    if loader == "stream" or (
            loader == "auto" and unlabelled_bytes(dataset, split.unlabelled) > memory_budget_mb * 1024 ** 2):
        return _streamed_split(split, dims, dataset, stream_buffer_rows)
    return _loaded_split(dataset.read_cases, split, dims, dataset.class_ids, dataset.num_channels,
                         dict(dataset.manifest["labels"]), dataset.settings)


def _loaded_split(load: Callable[[Sequence[str]], list[PreprocessedCase]], split: Split, dims: int,
                  class_ids: tuple[int, ...], in_channels: int, labels: dict[str, int],
                  settings: PreprocessSettings) -> PreparedData:
    """Every role of ``split`` in memory, its cases read by ``load``."""
    labelled = load(split.labelled)
    unlabelled = load(split.unlabelled)
    images = _training_samples([c.image for c in labelled + unlabelled], dims,
                               [channel_minimum(c.image, dims) for c in labelled + unlabelled])
    labels_l = _training_samples([c.label for c in labelled], dims, [0] * len(labelled),
                                 images.shape[2:]).astype(np.int64)
    evaluation = {role: [_eval_case(case) for case in load(getattr(split, role))]
                  for role in ("validation", "test")}
    return PreparedData(images[:len(labels_l)], labels_l, images[len(labels_l):], evaluation["validation"],
                        evaluation["test"], class_ids, in_channels, split,
                        training_spacing=median_spacing(labelled),
                        labelled_positions=sample_positions([c.image for c in labelled], dims),
                        unlabelled_positions=sample_positions([c.image for c in unlabelled], dims),
                        labels=labels, preprocessing=settings)


def _streamed_split(split: Split, dims: int, dataset: CachedDataset, buffer_rows: int) -> PreparedData:
    """Labelled samples in memory, the unlabelled pool streamed, evaluation cases read lazily."""
    shapes = [dataset.case_entry(cid)["shape"] for cid in (*split.labelled, *split.unlabelled)]
    sample_shape = tuple(int(n) for n in np.max([shape[:2] if dims == 2 else shape for shape in shapes], axis=0))
    labelled = dataset.read_cases(split.labelled)
    images = _training_samples([c.image for c in labelled], dims,
                               [channel_minimum(c.image, dims) for c in labelled], sample_shape)
    labels = _training_samples([c.label for c in labelled], dims, [0] * len(labelled), sample_shape)
    empty = np.zeros((0, dataset.num_channels, *sample_shape), np.float32)
    stream = StreamSpec(dataset.path, tuple(split.unlabelled), sample_shape, buffer_rows)
    return PreparedData(images, labels.astype(np.int64), empty, LazyCases(dataset, split.validation, _eval_case),
                        LazyCases(dataset, split.test, _eval_case), dataset.class_ids, dataset.num_channels,
                        split, unlabelled_stream=stream, training_spacing=median_spacing(labelled),
                        labelled_positions=sample_positions([c.image for c in labelled], dims),
                        labels=dict(dataset.manifest["labels"]), preprocessing=dataset.settings)


def median_spacing(cases: Sequence[PreprocessedCase]) -> tuple[float, float, float]:
    """Per-axis median voxel size in mm of ``cases`` (preprocessed); (1, 1, 1) when there are none."""
    if not cases:
        return (1.0, 1.0, 1.0)
    median = np.median(np.asarray([case.spacing for case in cases], dtype=np.float64), axis=0)
    return (float(median[0]), float(median[1]), float(median[2]))


def _preprocess_in_memory(layout: DatasetLayout, case_id: str, settings: PreprocessSettings) -> PreprocessedCase:
    case = layout.get_case(case_id)
    loaded = load_case(case, layout.class_ids)
    try:
        return preprocess_case(loaded, settings)
    except ValueError as error:
        raise DatasetError.single(case.image_paths[0], f"cannot preprocess case {case_id!r}: {error}") from None


def _training_samples(volumes: list[np.ndarray], dims: int, fills: list[np.ndarray | int],
                      shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Slices (dims 2) or volumes (dims 3) of every volume, padded to ``shape`` (default: the largest)."""
    samples = [to_slices(v) for v in volumes] if dims == 2 else [v[None] for v in volumes]
    if shape is None:
        shape = tuple(int(n) for n in np.max([s.shape[-dims:] for s in samples], axis=0))
    return np.concatenate([pad_centred(s, shape, fill) for s, fill in zip(samples, fills)])


def _eval_case(case: PreprocessedCase) -> EvalCase:
    if case.label is None:
        raise DatasetError.single(case.case_id, "evaluation case has no label")
    return EvalCase(case.case_id, case.image, case.label.astype(np.int64), case.spacing)


def open_dataset(path: str | Path) -> DatasetLayout:
    """Read a dataset folder in the nnU-Net v2 or Decathlon layout (see :func:`semiseg.data.formats.read_dataset`)."""
    return read_dataset(path)
