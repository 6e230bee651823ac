"""NIfTI input and output for prediction: find a folder's cases, read them, write the results.

Input folders follow nnU-Net's naming, one file per channel, ``{case}_{channel:04d}{ending}``
(``liver_007_0000.nii.gz``); for a one-channel model a folder may instead hold one file per
case, ``{case}{ending}``, chosen when no file name ends in ``_0000``. Every problem in a
folder (a stray name, a missing channel, a duplicate, channels that disagree) is collected
and raised as one :class:`~semiseg.data.errors.DatasetError`, one line per file.

Outputs keep the input's geometry: :func:`write_label_map` writes the input's affine and a
copy of its header (sform and qform with their codes), so the segmentation opens aligned in
ITK-SNAP or 3D Slicer; :func:`write_probabilities` writes an ``.npz``. Both write atomically.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from semiseg.data.errors import DatasetError, Problems
from semiseg.data.nifti import SUPPORTED_ENDINGS, max_voxels, nifti_ending, os_error_reason, unreadable_reason

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
AFFINE_TOLERANCE = 1e-4
"""Largest difference (absolute, per matrix entry) between the affines of one case's channels."""
PROBABILITY_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class InputCase:
    """One case of an input folder.

    Attributes:
        case_id: The case identifier, e.g. ``"liver_007"`` (output files are named after it).
        files: One image file per channel, in channel order.
    """

    case_id: str
    files: tuple[Path, ...]


def find_input_cases(
    folder: str | os.PathLike[str], num_channels: int, file_ending: str | None = ".nii.gz"
) -> list[InputCase]:
    """List the cases of an input folder, checking that each has every channel once.

    Args:
        folder: The folder of images (sub-folders and hidden files are ignored).
        num_channels: Channels the model takes.
        file_ending: ``".nii.gz"`` or ``".nii"``: the ending every image has (a NIfTI file with
            the other ending is an error); None accepts both (a channel present in both is a
            duplicate).

    Returns:
        The cases sorted by id.

    Raises:
        ValueError: On ``num_channels < 1`` or an unsupported ``file_ending``.
        DatasetError: When the folder is missing or holds no image, or, one line per file,
            on a name that does not follow the naming, a channel the model does not take,
            a duplicate, or a case missing a channel.
    """
    if num_channels < 1:
        raise ValueError(f"num_channels must be at least 1, got {num_channels}")
    if file_ending is not None and file_ending not in SUPPORTED_ENDINGS:
        raise ValueError(f"file_ending must be one of {SUPPORTED_ENDINGS} or None, got {file_ending!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError.single(folder, "input folder does not exist or is not a directory")
    problems: Problems = []
    files: list[tuple[str, Path]] = []
    for path in sorted(folder.iterdir()):
        ending = nifti_ending(path)
        if path.name.startswith(".") or ending is None or path.is_dir():
            continue
        if file_ending is not None and ending != file_ending:
            problems.append((str(path), f"ends in {ending} but the input images must end in {file_ending}"))
            continue
        files.append((path.name[: -len(ending)], path))
    if not files and not problems:
        wanted = file_ending or " or ".join(SUPPORTED_ENDINGS)
        raise DatasetError.single(folder, f"holds no NIfTI image ending in {wanted}")
    per_file = num_channels == 1 and not any(stem.endswith("_0000") for stem, _ in files)
    channels = _per_file_channels(files) if per_file else _suffixed_channels(files, num_channels, problems)
    cases = _complete_cases(channels, num_channels, folder, problems)
    if problems:
        raise DatasetError(problems)
    return cases


def read_input_case(case: InputCase) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Read a case's channels and check that they share one voxel grid.

    Args:
        case: A case from :func:`find_input_cases`.

    Returns:
        ``(image, reference)``: float32 ``[C, X, Y, Z]`` (scaling applied) and the nibabel
        image of channel 0, whose affine and header the outputs take.

    Raises:
        DatasetError: One line per file that cannot be read, is not 3D, or whose shape or
            affine (beyond :data:`AFFINE_TOLERANCE`) differs from channel 0's.
    """
    problems: Problems = []
    images: list[nib.Nifti1Image | None] = [_load_header(path, problems) for path in case.files]
    reference = images[0]
    if reference is not None:
        for path, img in zip(case.files[1:], images[1:]):
            if img is None:
                continue
            if img.shape != reference.shape:
                problems.append((str(path), f"shape {img.shape} differs from {reference.shape} of "
                                 f"channel 0 ({case.files[0].name})"))
            elif not np.allclose(img.affine, reference.affine, rtol=0.0, atol=AFFINE_TOLERANCE):
                problems.append((str(path), f"affine differs from channel 0's ({case.files[0].name}) by up to "
                                 f"{np.abs(img.affine - reference.affine).max():.3g}; channels must "
                                 "share one voxel grid"))
    if problems or reference is None:
        raise DatasetError(problems)
    data = [_load_voxels(path, img, problems) for path, img in zip(case.files, images) if img is not None]
    if problems:
        raise DatasetError(problems)
    return np.stack(data).astype(np.float32, copy=False), reference


def write_label_map(labels: np.ndarray, reference_image: nib.Nifti1Image, path: str | os.PathLike[str]) -> None:
    """Write an integer label map with the input's affine and header, atomically.

    The header is a copy of the reference's with the data type set (uint8 when every value
    fits, else int16), scaling reset (slope 1, intercept 0), the display range cleared and the
    sform and qform (with their codes) taken from the reference.

    Args:
        labels: Integer (or bool) ``[X, Y, Z]`` of the reference's shape, values >= 0.
        reference_image: The input's channel 0 image (from :func:`read_input_case`).
        path: The output file, ending in ``.nii.gz`` or ``.nii``.

    Raises:
        ValueError: On a wrong ending, a shape differing from the reference's, non-integer,
            negative or too large (> 32767) values.
    """
    path = Path(path)
    ending = nifti_ending(path)
    if ending is None:
        raise ValueError(f"{path}: a label map must end in {' or '.join(SUPPORTED_ENDINGS)}")
    labels = np.asarray(labels)
    if labels.dtype != np.bool_ and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers, got dtype {labels.dtype}")
    if labels.shape != tuple(reference_image.shape):
        raise ValueError(f"{path}: labels of shape {labels.shape} do not match the input's shape "
                         f"{tuple(reference_image.shape)}")
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if low < 0 or high > np.iinfo(np.int16).max:
        raise ValueError(f"{path}: label values must lie in [0, 32767], got [{low}, {high}]")
    dtype = np.uint8 if high < 256 else np.int16
    header = reference_image.header.copy()
    header.set_data_dtype(dtype)
    image = nib.Nifti1Image(labels.astype(dtype), reference_image.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"] = 0.0
    image.header["cal_max"] = 0.0
    reference_header = reference_image.header
    image.set_sform(reference_image.get_sform(), code=int(reference_header["sform_code"]))
    image.set_qform(reference_image.get_qform(), code=int(reference_header["qform_code"]))
    _atomic_write(path, ending, lambda tmp: nib.save(image, tmp))


def write_probabilities(
    probabilities: np.ndarray, path: str | os.PathLike[str], class_ids: Sequence[int], dtype: str = "float32"
) -> None:
    """Write class probabilities to a compressed ``.npz``, atomically.

    The file holds ``probabilities`` (``[K, X, Y, Z]``) and ``class_ids`` (``[K]``, the label
    value of each channel).

    Args:
        probabilities: ``[K, X, Y, Z]`` on the input's voxel grid.
        path: The output file (conventionally ``{case}.npz``).
        class_ids: The label value of each channel.
        dtype: ``"float32"`` or ``"float16"`` (half the size).

    Raises:
        ValueError: When the array is not 4D, ``class_ids`` does not have one value per
            channel, or ``dtype`` is not supported.
    """
    path = Path(path)
    probabilities = np.asarray(probabilities)
    ids = np.asarray(list(class_ids), dtype=np.int64)
    if probabilities.ndim != 4:
        raise ValueError(f"{path}: probabilities must be [K, X, Y, Z], got shape {probabilities.shape}")
    if ids.shape != (probabilities.shape[0],):
        raise ValueError(f"{path}: {len(ids)} class ids for {probabilities.shape[0]} probability channels")
    if dtype not in PROBABILITY_DTYPES:
        raise ValueError(f"{path}: dtype must be one of {PROBABILITY_DTYPES}, got {dtype!r}")
    values = probabilities.astype(dtype)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, probabilities=values, class_ids=ids)

    _atomic_write(path, ".npz", save)


def _per_file_channels(files: list[tuple[str, Path]]) -> dict[str, dict[int, list[Path]]]:
    channels: dict[str, dict[int, list[Path]]] = {}
    for stem, path in files:
        channels.setdefault(stem, {}).setdefault(0, []).append(path)
    return channels


def _suffixed_channels(
    files: list[tuple[str, Path]], num_channels: int, problems: Problems
) -> dict[str, dict[int, list[Path]]]:
    channels: dict[str, dict[int, list[Path]]] = {}
    for stem, path in files:
        match = _CHANNEL_SUFFIX.match(stem)
        if match is None:
            problems.append((str(path), "name does not follow {case}_{channel:04d} (e.g. case_0000"
                             f"{path.name[len(stem):]}) like the other images of the folder"))
            continue
        channel = int(match.group("channel"))
        if channel >= num_channels:
            problems.append((str(path), f"channel {channel:04d}, but the model takes {num_channels} "
                             f"channel(s) (0000 to {num_channels - 1:04d})"))
            continue
        channels.setdefault(match.group("case"), {}).setdefault(channel, []).append(path)
    return channels


def _complete_cases(
    channels: dict[str, dict[int, list[Path]]], num_channels: int, folder: Path, problems: Problems
) -> list[InputCase]:
    cases = []
    for case_id in sorted(channels):
        found = channels[case_id]
        complete = True
        for channel, paths in sorted(found.items()):
            for duplicate in paths[1:]:
                complete = False
                problems.append((str(duplicate), f"duplicate: case {case_id!r} channel {channel:04d} is "
                                 f"also in {paths[0].name}"))
        for channel in range(num_channels):
            if channel not in found:
                complete = False
                present_files = [paths[0] for _, paths in sorted(found.items())]
                ending = nifti_ending(present_files[0]) or ".nii.gz"
                expected = folder / f"{case_id}_{channel:04d}{ending}"
                present = ", ".join(p.name for p in present_files)
                problems.append((str(expected), f"missing: case {case_id!r} has {present} but not "
                                 f"channel {channel:04d}"))
        if complete:
            cases.append(InputCase(case_id, tuple(found[c][0] for c in range(num_channels))))
    return cases


def _load_header(path: Path, problems: Problems) -> nib.Nifti1Image | None:
    reason = unreadable_reason(path)
    if reason is not None:
        problems.append((str(path), reason))
        return None
    try:
        img = nib.load(str(path))
    except OSError as exc:
        reason = os_error_reason(path, exc) if exc.errno is not None else None
        problems.append((str(path), reason or f"not a readable NIfTI file (corrupt or wrong format): {exc}"))
        return None
    except (nib.filebasedimages.ImageFileError, EOFError, ValueError, TypeError) as exc:
        problems.append((str(path), f"not a readable NIfTI file (corrupt or wrong format): {exc}"))
        return None
    if len(img.shape) != 3:
        problems.append((str(path), f"expected a 3D image, got shape {img.shape} ({len(img.shape)}D)"))
        return None
    voxels = int(np.prod(img.shape, dtype=np.int64))
    if voxels > max_voxels():
        problems.append((str(path), f"header declares {voxels:,} voxels, over the limit of {max_voxels():,}"))
        return None
    return img


def _load_voxels(path: Path, img: nib.Nifti1Image, problems: Problems) -> np.ndarray:
    try:
        return np.asarray(img.get_fdata(dtype=np.float32))
    except (EOFError, OSError, ValueError) as exc:
        problems.append((str(path), f"cannot read its voxels (truncated or corrupt file): {exc}"))
        return np.zeros(img.shape, dtype=np.float32)


def _atomic_write(path: Path, ending: str, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=ending, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
