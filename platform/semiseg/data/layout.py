"""Read a dataset in the nnU-Net v2 raw layout.

The layout::

    ROOT/dataset.json                       channel_names, labels, numTraining, file_ending
    ROOT/imagesTr/{case}_{channel:04d}.nii.gz
    ROOT/labelsTr/{case}.nii.gz
    ROOT/imagesTs/{case}_{channel:04d}.nii.gz

Training images without a label file form the unlabelled pool used by
semi-supervised methods; an extra folder of unlabelled images, named like imagesTr, may
join them. Only names, ``dataset.json`` and whether each file can be opened are checked
here; :mod:`semiseg.data.validation` checks the voxels. :func:`semiseg.data.formats.read_dataset`
reads either layout; :mod:`semiseg.data.writer` writes this one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from semiseg.data.dataset import (
    CaseFiles,
    DatasetLayout,
    check_root,
    duplicate_case_problems,
    parse_channel_map,
    read_dataset_json,
    with_extra_unlabelled,
)
from semiseg.data.errors import DatasetError, Problems
from semiseg.data.nifti import SUPPORTED_ENDINGS, os_error_reason, unreadable_reason

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def read_layout(
    root: str | os.PathLike[str], extra_unlabelled: str | os.PathLike[str] | None = None
) -> DatasetLayout:
    """Find the cases of a dataset in the nnU-Net v2 raw layout.

    Only file names and ``dataset.json`` are checked here; use
    :func:`semiseg.data.validation.validate_layout` to check the voxel data as well.

    Args:
        root: The dataset folder (the one holding ``dataset.json``).
        extra_unlabelled: An optional folder of further unlabelled training images,
            named as in imagesTr (``CASE_0000.nii.gz`` per channel). They join
            ``training`` without labels.

    Returns:
        The dataset's layout.

    Raises:
        DatasetError: Listing every problem found: a missing folder, a
            missing, unparseable or incomplete ``dataset.json``, a missing
            ``imagesTr``, a case lacking a channel file, a label file without
            an image, a case id used more than once across imagesTr, imagesTs
            and the extra folder, or no training cases at all.
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
    layout = DatasetLayout(
        root=root,
        name=str(meta.get("name", root.name)),
        channel_names=channel_names,
        labels=labels,
        file_ending=file_ending,
        training=training,
        test=test,
    )
    if extra_unlabelled is None:
        return layout
    return with_extra_unlabelled(layout, *_scan_extra(Path(extra_unlabelled), layout))


def _scan_extra(folder: Path, layout: DatasetLayout) -> tuple[tuple[CaseFiles, ...], Problems]:
    problems: Problems = []
    extra, _ = _scan_images(folder, layout.file_ending, layout.num_channels, problems, required=True)
    if folder.is_dir() and not extra and not problems:
        problems.append(
            (str(folder), f"no unlabelled images found (expected files like CASE_0000{layout.file_ending})")
        )
    return tuple(CaseFiles(cid, paths, None) for cid, paths in extra.items()), problems


def _parse_channel_names(path: Path, meta: Mapping[str, Any], problems: Problems) -> dict[str, str]:
    return parse_channel_map(path, meta, "channel_names", problems)


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

