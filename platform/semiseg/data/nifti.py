"""One NIfTI file: its header limit, why it cannot be opened, reading its voxels, writing it.

Readers here record problems as ``(path, message)`` pairs instead of raising, so that a
dataset check reports every bad file at once (see :class:`~semiseg.data.errors.DatasetError`).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from semiseg.data.errors import DatasetError, Problems

SUPPORTED_ENDINGS = (".nii.gz", ".nii")

MAX_VOXELS = 1024**3
"""Most voxels one NIfTI file may declare in its header (every dimension multiplied,
channels and time included), checked before any of its data is read.

2**30 voxels are 4 GiB as float32, and loading holds a file's voxels at least twice
(decoded array, float32 image), so a larger file is either corrupt, hostile, or too big
for a training worker; the largest CT and MRI volumes of segmentation datasets (a
512 x 512 x 2000 whole-body CT: 0.5 * 2**30) fit. Without this check a header declaring
30000 x 30000 x 3000 voxels ends the study with a ``MemoryError``. The environment
variable named by :data:`MAX_VOXELS_ENV` overrides it (read where a file is loaded, so
it must also reach Ray workers that load cases).
"""
MAX_VOXELS_ENV = "SEMISEG_MAX_VOXELS"


@dataclass(frozen=True)
class Volume:
    """The voxels of one file (or one channel of a packed file), 3D, with its geometry.

    Attributes:
        data: float32 array ``[X, Y, Z]``; a 2D file has ``Z == 1``.
        affine: The 4x4 voxel-to-world matrix.
        spacing: Voxel size in mm along X, Y, Z (from the header).
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


def nifti_ending(path: Path) -> str | None:
    """The supported ending ``path``'s name has (``.nii.gz`` or ``.nii``), or None."""
    return next((e for e in SUPPORTED_ENDINGS if path.name.endswith(e)), None)


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be opened as a regular file, or None when it can.

    Args:
        path: A file of the dataset (symlinks are followed).

    Returns:
        ``"file does not exist"``, ``"symlink loop ..."``, ``"dangling symlink to X ..."``,
        ``"permission denied"``, ``"is a directory, not a NIfTI file"``, ``"is not a
        regular file ..."`` or the operating system's reason; None when readable.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return os_error_reason(path, exc)
    if stat.S_ISDIR(mode):
        return "is a directory, not a NIfTI file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a device, FIFO or socket); NIfTI files must be plain files"
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return os_error_reason(path, exc)
    return None


def os_error_reason(path: Path, exc: OSError) -> str:
    """Say in words why the operating system refused to open ``path``.

    Args:
        path: The file.
        exc: The error opening (or stat-ing) it raised.

    Returns:
        A short reason, e.g. ``"symlink loop: ..."`` or ``"dangling symlink to X (which does not exist)"``.
    """
    if exc.errno == errno.ELOOP:
        return "symlink loop: the symlink never resolves to a file"
    if exc.errno == errno.ENOENT:
        if os.path.islink(path):
            return f"dangling symlink to {os.path.realpath(path)} (which does not exist)"
        return "file does not exist"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EISDIR:
        return "is a directory, not a NIfTI file"
    return f"cannot read file: {exc.strerror or exc}"


def max_voxels() -> int:
    """The voxel limit of one file: ``$SEMISEG_MAX_VOXELS`` or :data:`MAX_VOXELS`.

    Raises:
        DatasetError: When the environment variable is not a positive integer.
    """
    raw = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not raw:
        return MAX_VOXELS
    try:
        limit = int(raw.replace("_", ""))
    except ValueError:
        limit = 0
    if limit <= 0:
        raise DatasetError.single(MAX_VOXELS_ENV, f"must be a positive number of voxels, got {raw!r}")
    return limit


def _oversized(shape: tuple[int, ...]) -> str | None:
    """The problem of a header declaring more voxels than :func:`max_voxels`, or None."""
    count = 1
    for size in shape:
        count *= int(size)
    limit = max_voxels()
    if count <= limit:
        return None
    return (f"header declares shape {'x'.join(str(int(s)) for s in shape)} = {count:,} voxels, over the "
            f"limit of {limit:,} voxels per file (set {MAX_VOXELS_ENV} to raise it); not reading its data")


def read_packed(path: Path, num_channels: int, problems: Problems) -> list[Volume | None]:
    """Read a file holding every channel of a case: 3D for one channel, 4D ``[X, Y, Z, C]`` for more.

    Args:
        path: The file (a Decathlon image).
        num_channels: The channels ``dataset.json`` declares.
        problems: Where an unreadable file or a wrong channel count is reported.

    Returns:
        One volume per channel, or ``[None]`` after a problem.
    """
    raw = _read_nifti(path, problems)
    if raw is None:
        return [None]
    data, affine, zooms = raw
    if data.ndim == 4 and data.shape[3] == num_channels:
        spacing = (zooms[0], zooms[1], zooms[2])
        return [Volume(data[..., c], affine, spacing) for c in range(num_channels)]
    if data.ndim in (2, 3) and num_channels == 1:
        return [_as_volume(path, data, affine, zooms, problems)]
    if data.ndim in (2, 3, 4):
        found = data.shape[3] if data.ndim == 4 else 1
        problems.append(
            (str(path), f"image has {found} channel(s) (shape {data.shape}) but dataset.json "
             f"declares {num_channels} modalities; multi-channel images must be 4D [X, Y, Z, C]")
        )
    else:
        problems.append(
            (str(path), f"expected a 3D image or a 4D [X, Y, Z, C] image, got shape {data.shape} ({data.ndim}D)")
        )
    return [None]


def read_volume(path: Path, problems: Problems) -> Volume | None:
    """Read a file holding one 2D or 3D channel (or a label map).

    Args:
        path: The file.
        problems: Where a file that cannot be read or used is reported, with its reason.

    Returns:
        Its voxels as float32 ``[X, Y, Z]`` (``Z == 1`` for 2D), or None after a problem.
    """
    raw = _read_nifti(path, problems)
    if raw is None:
        return None
    data, affine, zooms = raw
    return _as_volume(path, data, affine, zooms, problems)


def _read_nifti(path: Path, problems: Problems) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]] | None:
    shape_text = ""
    try:
        img = nib.load(str(path))  # lazy: reads the header only
        shape_text = f" (shape {img.shape})"
        too_big = _oversized(img.shape)
        if too_big is not None:
            problems.append((str(path), too_big))
            return None
        data = np.asarray(img.get_fdata(dtype=np.float32))
        zooms = tuple(float(z) for z in img.header.get_zooms())
        affine = np.asarray(img.affine, dtype=np.float64)
    except EOFError:
        problems.append(
            (str(path), "file is truncated (compressed data ends early); re-copy or re-export it")
        )
        return None
    except MemoryError:
        problems.append((str(path), f"not enough memory to load its voxels{shape_text}"))
        return None
    except OSError as exc:
        # gzip's BadGzipFile is an OSError without errno: a corrupt file, not an OS refusal.
        reason = os_error_reason(path, exc) if exc.errno is not None else None
        problems.append((str(path), reason or f"not a readable NIfTI file (corrupt or wrong format): {exc}"))
        return None
    except (nib.filebasedimages.ImageFileError, zlib.error, ValueError, TypeError) as exc:
        problems.append((str(path), f"not a readable NIfTI file (corrupt or wrong format): {exc}"))
        return None
    return data, affine, zooms


def _as_volume(
    path: Path, data: np.ndarray, affine: np.ndarray, zooms: tuple[float, ...], problems: Problems
) -> Volume | None:
    if data.ndim not in (2, 3):
        problems.append(
            (str(path), f"expected 2 or 3 spatial dimensions, got shape {data.shape} ({data.ndim}D)")
        )
        return None
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
        zooms = zooms[:2] + (1.0,)
    return Volume(data, affine, (zooms[0], zooms[1], zooms[2]))


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``data`` with ``affine`` (sform and qform, millimetres) to ``path``, atomically."""
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".nii.gz", dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

