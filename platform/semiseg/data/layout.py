"""Read, check and write datasets in the nnU-Net v2 raw layout.

The layout::

    ROOT/dataset.json                       channel_names, labels, numTraining, file_ending
    ROOT/imagesTr/{case}_{channel:04d}.nii.gz
    ROOT/labelsTr/{case}.nii.gz
    ROOT/imagesTs/{case}_{channel:04d}.nii.gz

Training images without a label file form the unlabelled pool used by
semi-supervised methods. :func:`read_dataset` also accepts the Medical
Segmentation Decathlon layout (see :mod:`semiseg.data.msd`) and an extra folder
of unlabelled images.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import stat
import tempfile
import zlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from semiseg.data.errors import DatasetError

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
SUPPORTED_ENDINGS = (".nii.gz", ".nii")
AFFINE_ATOL = 1e-3
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")

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

Problems = list[tuple[str, str]]


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case.

    Attributes:
        case_id: The case identifier, e.g. ``"phantom_003"``.
        image_paths: One image file per channel, in channel order.
        label_path: The label file, or None for unlabelled and test cases.
        packed_channels: 0 when each channel has its own file (nnU-Net); otherwise
            the single file of ``image_paths`` holds this many channels (Medical
            Segmentation Decathlon: 3D for one channel, 4D ``[X, Y, Z, C]`` for more).
    """

    case_id: str
    image_paths: tuple[Path, ...]
    label_path: Path | None
    packed_channels: int = 0


@dataclass(frozen=True)
class DatasetLayout:
    """A dataset in the nnU-Net v2 raw layout, as found on disk.

    Attributes:
        root: The dataset folder.
        name: ``dataset.json``'s ``name``, or the folder name when absent.
        channel_names: Channel index (as a string) to modality name.
        labels: Label name to integer value, background included.
        file_ending: The image file ending, e.g. ``".nii.gz"``.
        training: Cases under imagesTr (labelled or not), sorted by id.
        test: Cases under imagesTs, sorted by id.
        layout_format: ``"nnunet_v2"`` or ``"msd"`` (Medical Segmentation Decathlon).
    """

    root: Path
    name: str
    channel_names: dict[str, str]
    labels: dict[str, int]
    file_ending: str
    training: tuple[CaseFiles, ...]
    test: tuple[CaseFiles, ...]
    layout_format: str = "nnunet_v2"

    @property
    def labelled_ids(self) -> tuple[str, ...]:
        """Ids of training cases that have a label file."""
        return tuple(c.case_id for c in self.training if c.label_path is not None)

    @property
    def unlabelled_ids(self) -> tuple[str, ...]:
        """Ids of training cases without a label file."""
        return tuple(c.case_id for c in self.training if c.label_path is None)

    @property
    def num_channels(self) -> int:
        """Number of image channels per case."""
        return len(self.channel_names)

    @property
    def class_ids(self) -> tuple[int, ...]:
        """Declared label values, sorted (background included)."""
        return tuple(sorted(self.labels.values()))

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.class_ids)

    def get_case(self, case_id: str) -> CaseFiles:
        """Look a case up by id among training and test cases.

        Args:
            case_id: The case identifier.

        Returns:
            The case's files.

        Raises:
            KeyError: If no case has this id.
        """
        for case in self.training + self.test:
            if case.case_id == case_id:
                return case
        raise KeyError(f"no case {case_id!r} in dataset {self.root}")


@dataclass(frozen=True)
class LoadedCase:
    """The voxel data of one case.

    Attributes:
        case_id: The case identifier.
        image: float32 array ``[C, X, Y, Z]``; 2D cases have ``Z == 1``.
        label: int16 array ``[X, Y, Z]``, or None when the case has no label.
        spacing: Voxel size in mm along X, Y, Z (from the NIfTI header).
        affine: The 4x4 voxel-to-world matrix of the first channel.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray


@dataclass(frozen=True)
class _Volume:
    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


# --------------------------------------------------------------------------- reading


def read_layout(root: str | os.PathLike[str]) -> DatasetLayout:
    """Find the cases of a dataset in the nnU-Net v2 raw layout.

    Only file names and ``dataset.json`` are checked here; use
    :func:`validate_layout` to check the voxel data as well.

    Args:
        root: The dataset folder (the one holding ``dataset.json``).

    Returns:
        The dataset's layout.

    Raises:
        DatasetError: Listing every problem found: a missing folder, a
            missing, unparseable or incomplete ``dataset.json``, a missing
            ``imagesTr``, a case lacking a channel file, a label file without
            an image, a case id used in both imagesTr and imagesTs, or no
            training cases at all.
    """
    root = check_root(root)
    problems: Problems = []
    meta = read_dataset_json(root / "dataset.json", REQUIRED_KEYS, problems)
    channel_names = _parse_channel_names(root / "dataset.json", meta, problems)
    labels = _parse_labels(root / "dataset.json", meta, problems)
    file_ending = _parse_file_ending(root / "dataset.json", meta, problems)
    num_channels = len(channel_names) or None
    scanned = _scan_training(root, file_ending, num_channels, problems)
    test_paths, _ = _scan_images(root / "imagesTs", file_ending, num_channels, problems, required=False)
    training = tuple(CaseFiles(cid, paths, label) for cid, (paths, label) in scanned.items())
    test = tuple(CaseFiles(cid, paths, None) for cid, paths in test_paths.items())
    problems.extend(duplicate_case_problems(training + test))
    if problems:
        raise DatasetError(problems)
    return DatasetLayout(
        root=root,
        name=str(meta.get("name", root.name)),
        channel_names=channel_names,
        labels=labels,
        file_ending=file_ending,
        training=training,
        test=test,
    )


def read_dataset(
    root: str | os.PathLike[str], extra_unlabelled: str | os.PathLike[str] | None = None
) -> DatasetLayout:
    """Read a dataset in the nnU-Net v2 raw or the Medical Segmentation Decathlon layout.

    The layout is told by ``dataset.json``: a ``training`` list means the
    Decathlon layout (see :func:`semiseg.data.msd.read_msd`), anything else is
    read as nnU-Net v2 (``channel_names``, ``file_ending``), whose reader also
    reports a missing or broken ``dataset.json``.

    Args:
        root: The dataset folder (the one holding ``dataset.json``).
        extra_unlabelled: An optional folder of further unlabelled training
            images, named as in the dataset's own layout (nnU-Net:
            ``CASE_0000.nii.gz`` per channel; Decathlon: one ``CASE.nii.gz`` per
            case, 4D when multi-channel). They join ``training`` without labels.

    Returns:
        The dataset's layout, training cases sorted by id.

    Raises:
        DatasetError: Listing every problem of the layout, including case ids
            used more than once across imagesTr, imagesTs and the extra folder.
    """
    from semiseg.data.msd import is_msd_json, read_msd

    root = check_root(root)
    if is_msd_json(root / "dataset.json"):
        return read_msd(root, extra_unlabelled)
    layout = read_layout(root)
    if extra_unlabelled is None:
        return layout
    problems: Problems = []
    folder = Path(extra_unlabelled)
    extra, _ = _scan_images(folder, layout.file_ending, layout.num_channels, problems, required=True)
    if folder.is_dir() and not extra and not problems:
        problems.append(
            (str(folder), f"no unlabelled images found (expected files like CASE_0000{layout.file_ending})")
        )
    cases = tuple(CaseFiles(cid, paths, None) for cid, paths in extra.items())
    return with_extra_unlabelled(layout, cases, problems)


def with_extra_unlabelled(
    layout: DatasetLayout, cases: Iterable[CaseFiles], problems: Problems | None = None
) -> DatasetLayout:
    """Add unlabelled training cases to a layout, checking that case ids stay unique.

    Args:
        layout: The dataset read so far.
        cases: The extra cases (their ``label_path`` is ignored and set to None).
        problems: Problems already found while scanning the extra cases.

    Returns:
        A copy of ``layout`` whose ``training`` also holds the extra cases, sorted by id.

    Raises:
        DatasetError: With ``problems`` and every case id used twice.
    """
    problems = list(problems or [])
    extra = tuple(dataclasses.replace(case, label_path=None) for case in cases)
    problems.extend(duplicate_case_problems(layout.training + layout.test + extra))
    if problems:
        raise DatasetError(problems)
    training = tuple(sorted(layout.training + extra, key=lambda case: case.case_id))
    return dataclasses.replace(layout, training=training)


def duplicate_case_problems(cases: Iterable[CaseFiles]) -> Problems:
    """Report case ids that more than one case uses.

    Args:
        cases: Every case of a dataset (training, test and extra ones).

    Returns:
        One ``(path, message)`` problem per repeated use, naming the repeated
        case's first image file and the file of the case that used the id first.
    """
    first: dict[str, CaseFiles] = {}
    problems: Problems = []
    for case in cases:
        earlier = first.setdefault(case.case_id, case)
        if earlier is not case:
            problems.append(
                (str(case.image_paths[0]), f"duplicate case id {case.case_id!r}: "
                 f"{earlier.image_paths[0]} already uses it; case ids must be unique")
            )
    return problems


def check_root(root: str | os.PathLike[str]) -> Path:
    """Return ``root`` as a Path after checking that it is a folder.

    Args:
        root: The dataset folder.

    Returns:
        The folder.

    Raises:
        DatasetError: When it does not exist or is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise DatasetError.single(root, f"dataset folder {what}")
    return root


def read_dataset_json(path: Path, required: Iterable[str], problems: Problems) -> dict[str, Any]:
    """Parse ``dataset.json``, recording problems instead of raising.

    Args:
        path: The ``dataset.json`` file.
        required: Keys that must be present.
        problems: Where problems are appended as ``(path, message)``.

    Returns:
        The parsed object, or ``{}`` when it is missing or unparseable.
    """
    if not path.is_file():
        problems.append((str(path), "dataset.json is missing; every nnU-Net dataset needs one"))
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append((str(path), f"cannot parse dataset.json as JSON ({exc})"))
        return {}
    if not isinstance(meta, dict):
        problems.append((str(path), "dataset.json must hold a JSON object"))
        return {}
    for key in required:
        if key not in meta:
            problems.append((str(path), f"dataset.json is missing the required key {key!r}"))
    return meta


def _parse_channel_names(path: Path, meta: Mapping[str, Any], problems: Problems) -> dict[str, str]:
    return parse_channel_map(path, meta, "channel_names", problems)


def parse_channel_map(path: Path, meta: Mapping[str, Any], key: str, problems: Problems) -> dict[str, str]:
    """``{"0": "T1", "1": "T2"}`` under ``key`` (nnU-Net ``channel_names``, Decathlon ``modality``).

    Args:
        path: the ``dataset.json``, named in problems.
        meta: its parsed content.
        key: the entry to read.
        problems: where a malformed entry is reported.

    Returns:
        Channel index (as a string) to name, contiguous from "0"; {} when absent or malformed.
    """
    raw = meta.get(key)
    if raw is None:
        return {}
    expected = [str(i) for i in range(len(raw))] if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or not raw or sorted(raw, key=_int_or_inf) != expected:
        problems.append((str(path), f'"{key}" must map "0", "1", ... to modality names, got {raw!r}'))
        return {}
    return {str(i): str(raw[str(i)]) for i in range(len(raw))}


def _int_or_inf(text: str) -> float:
    return int(text) if text.isdigit() else float("inf")


def _parse_labels(path: Path, meta: Mapping[str, Any], problems: Problems) -> dict[str, int]:
    raw = meta.get("labels")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        problems.append((str(path), f'"labels" must map label names to integers, got {raw!r}'))
        return {}
    labels: dict[str, int] = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(
                (str(path), f"label {name!r} has value {value!r}; only integer labels are supported")
            )
        else:
            labels[str(name)] = value
    if labels and 0 not in labels.values():
        problems.append((str(path), '"labels" must declare the background with value 0'))
    return labels


def _parse_file_ending(path: Path, meta: Mapping[str, Any], problems: Problems) -> str:
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in SUPPORTED_ENDINGS:
        problems.append(
            (str(path), f"file_ending {ending!r} is not supported (use one of {SUPPORTED_ENDINGS})")
        )
        return ".nii.gz"
    return str(ending)


def _scan_training(
    root: Path, file_ending: str, num_channels: int | None, problems: Problems
) -> dict[str, tuple[tuple[Path, ...], Path | None]]:
    images, seen = _scan_images(root / "imagesTr", file_ending, num_channels, problems, required=True)
    labels = _list_files(root / "labelsTr", file_ending, problems)
    for case_id, label_path in sorted(labels.items()):
        if case_id not in seen and (root / "imagesTr").is_dir():
            problems.append(
                (str(label_path), f"label file has no image: expected imagesTr/{case_id}_0000{file_ending}")
            )
    if (root / "imagesTr").is_dir() and not seen:
        problems.append(
            (str(root / "imagesTr"), f"no training cases found (expected files like CASE_0000{file_ending})")
        )
    return {cid: (paths, labels.get(cid)) for cid, paths in images.items()}


def _scan_images(
    folder: Path, file_ending: str, num_channels: int | None, problems: Problems, *, required: bool
) -> tuple[dict[str, tuple[Path, ...]], set[str]]:
    """Group a folder's image files by case: complete cases, and ids of all cases seen.

    ``num_channels=None`` infers the channel count from the files.
    """
    if not folder.is_dir():
        if required:
            problems.append((str(folder), f"{folder.name} folder is missing"))
        return {}, set()
    by_case: dict[str, dict[int, Path]] = {}
    for stem, path in _list_files(folder, file_ending, problems).items():
        match = _CHANNEL_RE.match(stem)
        if match is None:
            problems.append(
                (str(path), "image name must end with a 4-digit channel index, "
                 f"e.g. {stem}_0000{file_ending}")
            )
            continue
        by_case.setdefault(match["case"], {})[int(match["channel"])] = path
    if num_channels is None:
        num_channels = 1 + max((max(found) for found in by_case.values()), default=0)
    cases: dict[str, tuple[Path, ...]] = {}
    for case_id in sorted(by_case):
        paths = _case_channels(folder, case_id, by_case[case_id], file_ending, num_channels, problems)
        if paths is not None:
            cases[case_id] = paths
    return cases, set(by_case)


def _case_channels(
    folder: Path,
    case_id: str,
    found: dict[int, Path],
    file_ending: str,
    num_channels: int,
    problems: Problems,
) -> tuple[Path, ...] | None:
    ok = True
    for channel in range(num_channels):
        if channel not in found:
            expected = folder / f"{case_id}_{channel:04d}{file_ending}"
            problems.append((str(expected), f"channel {channel} file of case {case_id!r} is missing"))
            ok = False
    for channel in sorted(c for c in found if c >= num_channels):
        problems.append(
            (str(found[channel]), f"channel {channel} is not declared in dataset.json channel_names")
        )
        ok = False
    return tuple(found[c] for c in range(num_channels)) if ok else None


def _list_files(folder: Path, file_ending: str, problems: Problems) -> dict[str, Path]:
    """Every entry named ``*{file_ending}`` (hidden ones aside), readable or not.

    An entry that cannot be read (a broken symlink, a folder, no permission) is kept,
    so that its case is neither dropped nor left unlabelled in silence, and its
    reason is added to ``problems``.
    """
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        problems.append((str(folder), f"cannot list folder: {os_error_reason(folder, exc)}"))
        return found
    for path in entries:
        if path.name.endswith(file_ending) and not path.name.startswith("."):
            reason = unreadable_reason(path)
            if reason is not None:
                problems.append((str(path), reason))
            found[path.name[: -len(file_ending)]] = path
    return found


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


# --------------------------------------------------------------------------- loading


def load_case(
    case: CaseFiles, declared_labels: Collection[int] | None = None, *, check_constant: bool = False
) -> LoadedCase:
    """Load and check the voxel data of one case.

    Args:
        case: The case's files, e.g. from :func:`read_layout`.
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
        layout: The dataset, from :func:`read_layout`.

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
        channels = _read_packed(case.image_paths[0], case.packed_channels, problems)
        paths = [case.image_paths[0]] * len(channels)
        where = [f" channel {k}" for k in range(len(channels))] if len(channels) > 1 else [""]
    else:
        channels = [_read_volume(p, problems) for p in case.image_paths]
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


def _read_packed(path: Path, num_channels: int, problems: Problems) -> list[_Volume | None]:
    """Read a file holding every channel of a case: 3D for one channel, 4D ``[X, Y, Z, C]`` for more."""
    raw = _read_nifti(path, problems)
    if raw is None:
        return [None]
    data, affine, zooms = raw
    if data.ndim == 4 and data.shape[3] == num_channels:
        spacing = (zooms[0], zooms[1], zooms[2])
        return [_Volume(data[..., c], affine, spacing) for c in range(num_channels)]
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


def _read_volume(path: Path, problems: Problems) -> _Volume | None:
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
) -> _Volume | None:
    if data.ndim not in (2, 3):
        problems.append(
            (str(path), f"expected 2 or 3 spatial dimensions, got shape {data.shape} ({data.ndim}D)")
        )
        return None
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
        zooms = zooms[:2] + (1.0,)
    return _Volume(data, affine, (zooms[0], zooms[1], zooms[2]))


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
    paths: Iterable[Path], channels: list[_Volume | None], problems: Problems
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
    image: _Volume | None,
    declared_labels: Collection[int] | None,
    problems: Problems,
) -> np.ndarray | None:
    if case.label_path is None:
        return None
    path = case.label_path
    vol = _read_volume(path, problems)
    if vol is None:
        return None
    n_before = len(problems)
    if image is not None:
        _check_label_geometry(path, vol, image, problems)
    _check_label_values(path, vol.data, declared_labels, problems)
    if len(problems) > n_before:
        return None
    return vol.data.astype(np.int16)


def _check_label_geometry(path: Path, label: _Volume, image: _Volume, problems: Problems) -> None:
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


# --------------------------------------------------------------------------- writing


def write_case(
    root: str | os.PathLike[str],
    case_id: str,
    image: np.ndarray,
    label: np.ndarray | None,
    spacing: tuple[float, float, float],
    split: str = "Tr",
    affine: np.ndarray | None = None,
) -> CaseFiles:
    """Write one case as NIfTI files, atomically per file.

    Args:
        root: The dataset folder.
        case_id: The case identifier (no channel suffix).
        image: Array ``[C, X, Y, Z]``; saved as float32, one file per channel.
        label: Integer array ``[X, Y, Z]`` or None; saved as int16 in labelsTr.
        spacing: Voxel size in mm along X, Y, Z.
        split: ``"Tr"`` (imagesTr/labelsTr) or ``"Ts"`` (imagesTs, no label).
        affine: 4x4 voxel-to-world matrix; defaults to ``diag(spacing)``. Its
            column norms must equal ``spacing``.

    Returns:
        The files written.

    Raises:
        ValueError: On a bad split, array shapes, a label for a test case, or
            an affine inconsistent with ``spacing``.
    """
    image = np.asarray(image)
    _check_write_args(image, label, split)
    affine = _affine_for(spacing, affine)
    root = Path(root)
    image_dir = root / f"images{split}"
    image_dir.mkdir(parents=True, exist_ok=True)
    image_paths = []
    for channel, data in enumerate(image):
        path = image_dir / f"{case_id}_{channel:04d}.nii.gz"
        _save_nifti(np.asarray(data, dtype=np.float32), affine, path)
        image_paths.append(path)
    label_path = None
    if label is not None:
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        label_path = root / "labelsTr" / f"{case_id}.nii.gz"
        _save_nifti(np.asarray(label).astype(np.int16), affine, label_path)
    return CaseFiles(case_id, tuple(image_paths), label_path)


def _check_write_args(image: np.ndarray, label: np.ndarray | None, split: str) -> None:
    if split not in ("Tr", "Ts"):
        raise ValueError(f"split must be 'Tr' or 'Ts', got {split!r}")
    if image.ndim != 4:
        raise ValueError(f"image must be [C, X, Y, Z], got shape {image.shape}")
    if label is None:
        return
    if split == "Ts":
        raise ValueError("test cases (split='Ts') are written without labels")
    if np.shape(label) != image.shape[1:]:
        raise ValueError(f"label shape {np.shape(label)} does not match image shape {image.shape[1:]}")


def _affine_for(spacing: tuple[float, float, float], affine: np.ndarray | None) -> np.ndarray:
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if spacing_arr.shape != (3,) or np.any(spacing_arr <= 0):
        raise ValueError(f"spacing must be 3 positive numbers, got {spacing}")
    if affine is None:
        return np.diag([*spacing_arr, 1.0])
    affine = np.asarray(affine, dtype=np.float64)
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if affine.shape != (4, 4) or not np.allclose(norms, spacing_arr, atol=1e-4):
        raise ValueError(f"affine column norms {norms} do not match spacing {tuple(spacing_arr)}")
    return affine


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
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


def write_dataset_json(
    root: str | os.PathLike[str],
    name: str,
    channel_names: Mapping[str, str],
    labels: Mapping[str, int],
    num_training: int,
    file_ending: str = ".nii.gz",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``dataset.json`` atomically.

    Args:
        root: The dataset folder (created if missing).
        name: The dataset name.
        channel_names: Channel index (as a string) to modality name.
        labels: Label name to integer value, background (0) included.
        num_training: Number of training cases (``numTraining``).
        file_ending: The image file ending.
        extra: Further keys to store (e.g. generator parameters).

    Returns:
        The path of the file written.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "name": name,
        "channel_names": {str(k): str(v) for k, v in channel_names.items()},
        "labels": {str(k): int(v) for k, v in labels.items()},
        "numTraining": int(num_training),
        "file_ending": file_ending,
    }
    meta.update(extra or {})
    path = root / "dataset.json"
    _write_text_atomic(path, json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return path


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
