"""Load a case's voxels and check them: readable files, finite voxels, channels and label
aligned with each other, only declared label values, no constant image.

:func:`validate_layout` checks a whole dataset on the study driver and reports every problem
of every case at once; :func:`load_case` checks one case where it is loaded (the cache build,
in-memory preprocessing).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from pathlib import Path

import numpy as np

from semiseg.data.dataset import CaseFiles, DatasetLayout, LoadedCase
from semiseg.data.errors import DatasetError, Problems
from semiseg.data.nifti import Volume, read_packed, read_volume

AFFINE_ATOL = 1e-3
"""Largest difference between two affines (mm) still taken as the same grid."""


def load_case(
    case: CaseFiles, declared_labels: Collection[int] | None = None, *, check_constant: bool = False
) -> LoadedCase:
    """Load and check the voxel data of one case.

    Args:
        case: The case's files, e.g. from :func:`semiseg.data.formats.read_dataset`.
        declared_labels: Label values allowed in the label file (usually
            ``layout.class_ids``); None skips this check.
        check_constant: Also reject constant image channels (see :func:`validate_layout`).

    Returns:
        The case's image ``[C, X, Y, Z]``, label, spacing and affine.

    Raises:
        DatasetError: Naming the file, when a file is unreadable, truncated
            or not NIfTI; has other than 2 or 3 spatial dimensions (a packed
            Decathlon image: other than the declared channel count along its
            4th axis); holds NaN/Inf voxels; when channel shapes or affines
            differ; when the label's shape or affine differs from the image's;
            or when the label holds values not declared in ``dataset.json``.
    """
    loaded, problems = _load_checked(case, declared_labels, check_constant=check_constant)
    if problems or loaded is None:
        raise DatasetError(problems)
    return loaded


def validate_layout(layout: DatasetLayout) -> None:
    """Load every case once and report all problems found, across all cases.

    Besides the checks of :func:`load_case`, flags constant images (which
    would make intensity normalisation divide by zero).

    Args:
        layout: The dataset, from :func:`semiseg.data.formats.read_dataset`.

    Raises:
        DatasetError: Listing every problem of every case.
    """
    problems: Problems = []
    for case in layout.training + layout.test:
        problems.extend(_load_checked(case, layout.class_ids, check_constant=True)[1])
    if problems:
        raise DatasetError(problems)


def _load_checked(
    case: CaseFiles, declared_labels: Collection[int] | None, *, check_constant: bool
) -> tuple[LoadedCase | None, Problems]:
    problems: Problems = []
    if case.packed_channels:
        channels = read_packed(case.image_paths[0], case.packed_channels, problems)
        paths = [case.image_paths[0]] * len(channels)
        where = [f" channel {k}" for k in range(len(channels))] if len(channels) > 1 else [""]
    else:
        channels = [read_volume(p, problems) for p in case.image_paths]
        paths = list(case.image_paths)
        where = [""] * len(channels)
    for path, vol, place in zip(paths, channels, where):
        if vol is not None:
            _check_finite(path, vol.data, problems, place)
            if check_constant:
                _check_not_constant(path, vol.data, problems, place)
    _check_channels_agree(paths, channels, problems)
    label = _load_label(case, channels[0] if channels else None, declared_labels, problems)
    if problems or not channels or channels[0] is None:
        return None, problems
    first = channels[0]
    image = np.stack([v.data for v in channels if v is not None]).astype(np.float32, copy=False)
    return LoadedCase(case.case_id, image, label, first.spacing, first.affine), problems

def _check_finite(path: Path, data: np.ndarray, problems: Problems, where: str = "") -> None:
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        problems.append((str(path), f"image{where} holds {bad} NaN/Inf voxel(s)"))


def _check_not_constant(path: Path, data: np.ndarray, problems: Problems, where: str = "") -> None:
    if data.size and np.all(data == data.flat[0]):
        problems.append(
            (str(path), f"constant image{where} (every voxel is {data.flat[0]:g}), "
             "intensity normalisation would divide by zero")
        )


def _check_channels_agree(
    paths: Iterable[Path], channels: list[Volume | None], problems: Problems
) -> None:
    pairs = [(p, v) for p, v in zip(paths, channels) if v is not None]
    if not pairs:
        return
    ref_path, ref = pairs[0]
    for path, vol in pairs[1:]:
        if vol.data.shape != ref.data.shape:
            problems.append(
                (str(path), f"channel shape {vol.data.shape} differs from "
                 f"{ref_path.name} shape {ref.data.shape}")
            )
        elif not np.allclose(vol.affine, ref.affine, atol=AFFINE_ATOL):
            problems.append((str(path), f"channel affine differs from {ref_path.name} affine"))


def _load_label(
    case: CaseFiles,
    image: Volume | None,
    declared_labels: Collection[int] | None,
    problems: Problems,
) -> np.ndarray | None:
    if case.label_path is None:
        return None
    path = case.label_path
    vol = read_volume(path, problems)
    if vol is None:
        return None
    n_before = len(problems)
    if image is not None:
        _check_label_geometry(path, vol, image, problems)
    _check_label_values(path, vol.data, declared_labels, problems)
    if len(problems) > n_before:
        return None
    return vol.data.astype(np.int16)


def _check_label_geometry(path: Path, label: Volume, image: Volume, problems: Problems) -> None:
    if label.data.shape != image.data.shape:
        problems.append(
            (str(path), f"label shape {label.data.shape} does not match image shape {image.data.shape}")
        )
    elif not np.allclose(label.affine, image.affine, atol=AFFINE_ATOL):
        diff = float(np.max(np.abs(label.affine - image.affine)))
        problems.append(
            (str(path), f"label affine does not match image affine (largest difference {diff:.4g}); "
             "the label is not aligned with the image")
        )


def _check_label_values(
    path: Path, data: np.ndarray, declared: Collection[int] | None, problems: Problems
) -> None:
    if not np.all(np.isfinite(data)) or not np.all(data == np.round(data)):
        problems.append((str(path), "label holds non-integer or NaN/Inf values"))
        return
    if declared is None:
        return
    allowed = {int(v) for v in declared}
    undeclared = sorted(int(v) for v in np.unique(data) if int(v) not in allowed)
    if undeclared:
        problems.append(
            (str(path), f"label values {undeclared} are not declared in dataset.json labels "
             f"(declared: {sorted(declared)})")
        )

