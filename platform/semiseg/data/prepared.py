"""Cases of one split, loaded, normalised and arranged for training and evaluation.

Training uses 2D slices (``data.dims = 2``, slices along the last axis) or whole 3D
volumes (``data.dims = 3``); validation and test always run on whole cases so that
metrics are per case in millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semiseg.data.errors import DatasetError
from semiseg.data.layout import DatasetLayout, LoadedCase, load_case, read_layout
from semiseg.data.splits import Split, make_split


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
        unlabelled_images: ``[M, C, *spatial]`` float32 (labels hidden or absent).
        validation, test: whole cases for evaluation.
        class_ids: label values including background (0).
        in_channels: image channels.
        split: the case-level split these arrays came from.
    """

    labelled_images: np.ndarray
    labelled_labels: np.ndarray
    unlabelled_images: np.ndarray
    validation: list[EvalCase]
    test: list[EvalCase]
    class_ids: tuple[int, ...]
    in_channels: int
    split: Split

    @property
    def num_classes(self) -> int:
        """Number of output classes (background included)."""
        return len(self.class_ids)


def normalise_image(image: np.ndarray) -> np.ndarray:
    """Z-score each channel of ``image`` ``[C, ...]`` over all its voxels.

    Raises:
        ValueError: a channel is constant (its standard deviation is 0).
    """
    image = image.astype(np.float32, copy=True)
    for channel in range(image.shape[0]):
        std = float(image[channel].std())
        if std == 0.0:
            raise ValueError("constant image channel: intensity normalisation would divide by zero")
        image[channel] = (image[channel] - float(image[channel].mean())) / std
    return image


def to_slices(volume: np.ndarray) -> np.ndarray:
    """``[C, X, Y, Z]`` → ``[Z, C, X, Y]`` (or ``[X, Y, Z]`` → ``[Z, X, Y]``)."""
    return np.ascontiguousarray(np.moveaxis(volume, -1, 0))


def prepare_split(layout: DatasetLayout, *, num_labelled: int, num_validation: int, num_test: int,
                  split_seed: int, dims: int) -> PreparedData:
    """Split ``layout`` by case and load every role.

    Args:
        layout: a dataset read by :func:`semiseg.data.read_layout`.
        num_labelled, num_validation, num_test: cases per role (the rest is unlabelled).
        split_seed: seed of the case-level split.
        dims: 2 (training on slices) or 3 (training on volumes).

    Returns:
        The prepared arrays.

    Raises:
        DatasetError: a file cannot be used, or the budget exceeds the labelled cases.
    """
    if dims not in (2, 3):
        raise DatasetError.single("data.dims", f"must be 2 or 3, got {dims}")
    split = make_split(layout.labelled_ids, layout.unlabelled_ids, num_labelled=num_labelled,
                       num_validation=num_validation, num_test=num_test, seed=split_seed)
    declared = layout.class_ids

    def load(case_id: str) -> LoadedCase:
        case = load_case(layout.get_case(case_id), declared)
        try:
            image = normalise_image(case.image)
        except ValueError as error:
            raise DatasetError.single(case.case_id, str(error)) from None
        return LoadedCase(case.case_id, image, case.label, case.spacing, case.affine)

    labelled = [load(case_id) for case_id in split.labelled]
    unlabelled = [load(case_id) for case_id in split.unlabelled]
    images_l = _training_samples([c.image for c in labelled], dims)
    labels_l = _training_samples([c.label for c in labelled], dims).astype(np.int64)
    images_u = (_training_samples([c.image for c in unlabelled], dims) if unlabelled
                else np.zeros((0, *images_l.shape[1:]), np.float32))
    evaluation = {role: [_eval_case(load(case_id)) for case_id in getattr(split, role)]
                  for role in ("validation", "test")}
    return PreparedData(images_l, labels_l, images_u, evaluation["validation"], evaluation["test"],
                        tuple(declared), layout.num_channels, split)


def _training_samples(volumes: list[np.ndarray], dims: int) -> np.ndarray:
    if dims == 2:
        return np.concatenate([to_slices(v) for v in volumes])
    shapes = {v.shape for v in volumes}
    if len(shapes) != 1:
        raise DatasetError.single("data.dims", f"3D training needs equal case shapes here, got {sorted(shapes)}")
    return np.stack(volumes)


def _eval_case(case: LoadedCase) -> EvalCase:
    if case.label is None:
        raise DatasetError.single(case.case_id, "evaluation case has no label")
    return EvalCase(case.case_id, case.image, case.label.astype(np.int64), case.spacing)


def open_dataset(path: str | Path) -> DatasetLayout:
    """Read a dataset folder in the nnU-Net raw layout (see :func:`semiseg.data.read_layout`)."""
    return read_layout(path)
