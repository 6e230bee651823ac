"""Read datasets in the Medical Segmentation Decathlon (MSD) layout.

The layout::

    ROOT/dataset.json     modality {"0": "MRI"}, labels {"0": "background", "1": ...},
                          training [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}],
                          test ["./imagesTs/y.nii.gz"]
    ROOT/imagesTr/x.nii.gz      3D for one modality, 4D [X, Y, Z, C] for several
    ROOT/labelsTr/x.nii.gz

``dataset.json`` is authoritative: only the files it lists are cases (MSD
archives also carry macOS ``._x.nii.gz`` files, which are never read). A
training entry without ``label`` (or with ``"label": null``) is unlabelled. The
case id is the image file name without its ending. MSD ``labels`` map value to
name, the inverse of nnU-Net v2; the returned layout uses nnU-Net's name to
value form, so every later step sees one :class:`DatasetLayout`.

**Entries stay inside the dataset folder.** ``dataset.json`` is data, often
downloaded, so its entries may not name files elsewhere: an absolute entry, or
one whose ``..`` components lead (after resolving symlinks) outside the folder,
is refused. Symlinks placed *inside* the folder are followed wherever they
point (``imagesTr -> /mnt/disk2/imagesTr``, a linked file, or a linked dataset
folder): whoever made them chose that data, so data on another disk keeps working.
"""

from __future__ import annotations

import json
import os
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
from semiseg.data.nifti import SUPPORTED_ENDINGS, nifti_ending, os_error_reason, unreadable_reason

MSD_REQUIRED_KEYS = ("modality", "labels", "training")
LAYOUT_FORMAT = "msd"


def is_msd_json(path: Path) -> bool:
    """Tell whether a ``dataset.json`` describes a Decathlon dataset.

    Args:
        path: The ``dataset.json`` file.

    Returns:
        True when it parses to an object with a ``training`` list and no
        nnU-Net v2 ``channel_names``; False otherwise (also when unreadable).
    """
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("training"), list) and "channel_names" not in meta


def read_msd(
    root: str | os.PathLike[str], extra_unlabelled: str | os.PathLike[str] | None = None
) -> DatasetLayout:
    """Read a dataset in the Medical Segmentation Decathlon layout.

    Only ``dataset.json`` and the existence of the listed files are checked
    here; :func:`semiseg.data.validation.validate_layout` checks the voxels
    (including each image's channel count against ``modality``).

    Args:
        root: The dataset folder (the one holding ``dataset.json``).
        extra_unlabelled: An optional folder of further unlabelled images,
            one ``CASE.nii.gz`` per case (4D when multi-channel).

    Returns:
        The layout, with ``layout_format == "msd"`` and every case's image in
        one file (``CaseFiles.packed_channels`` channels).

    Raises:
        DatasetError: Listing every problem: a missing or unparseable
            ``dataset.json`` or required key, malformed ``modality``/``labels``,
            a malformed entry, a listed file that does not exist, a file that is
            not ``.nii``/``.nii.gz``, an empty ``training`` list, or a case id
            used twice.
    """
    root = check_root(root)
    json_path = root / "dataset.json"
    problems: Problems = []
    meta = read_dataset_json(json_path, MSD_REQUIRED_KEYS, problems)
    channel_names = parse_channel_map(json_path, meta, "modality", problems)
    labels = _parse_labels(json_path, meta, problems)
    packed = len(channel_names) or 1
    training = _parse_training(root, json_path, meta.get("training"), packed, problems)
    test = _parse_test(root, json_path, meta.get("test", []), packed, problems)
    problems.extend(duplicate_case_problems(training + test))
    if problems:
        raise DatasetError(problems)
    layout = DatasetLayout(
        root=root,
        name=str(meta.get("name", root.name)),
        channel_names=channel_names,
        labels=labels,
        file_ending=nifti_ending(training[0].image_paths[0]) or ".nii.gz",
        training=tuple(sorted(training, key=lambda case: case.case_id)),
        test=tuple(sorted(test, key=lambda case: case.case_id)),
        layout_format=LAYOUT_FORMAT,
    )
    if extra_unlabelled is None:
        return layout
    extra = _scan_extra(Path(extra_unlabelled), packed, problems)
    return with_extra_unlabelled(layout, extra, problems)


def _parse_labels(path: Path, meta: Mapping[str, Any], problems: Problems) -> dict[str, int]:
    """MSD ``{"0": "background", "1": "tumour"}`` (value to name) → ``{"background": 0, "tumour": 1}``."""
    raw = meta.get("labels")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        problems.append((str(path), f'"labels" must map label values ("0", "1", ...) to names, got {raw!r}'))
        return {}
    labels: dict[str, int] = {}
    for value, name in raw.items():
        if not str(value).lstrip("-").isdigit():
            problems.append(
                (str(path), f'label value {value!r} (named {name!r}) is not an integer; Decathlon '
                 '"labels" map values to names, e.g. {"0": "background", "1": "tumour"}')
            )
        elif str(name) in labels:
            problems.append(
                (str(path), f"label name {name!r} is used for values {labels[str(name)]} and {value}; "
                 "label names must be unique")
            )
        else:
            labels[str(name)] = int(value)
    if labels and 0 not in labels.values():
        problems.append((str(path), '"labels" must declare the background with value "0"'))
    return labels


def _parse_training(
    root: Path, json_path: Path, raw: Any, packed: int, problems: Problems
) -> tuple[CaseFiles, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append((str(json_path), f'"training" must be a list of {{"image": ..., "label": ...}}, got {raw!r}'))
        return ()
    if not raw:
        problems.append((str(json_path), 'the "training" list is empty: no training cases'))
        return ()
    cases = []
    for index, entry in enumerate(raw):
        where = f"training[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            problems.append((str(json_path), f'{where} must be an object with an "image" path, got {entry!r}'))
            continue
        label = entry.get("label")
        if label is not None and not isinstance(label, str):
            problems.append((str(json_path), f'{where} "label" must be a path or null, got {label!r}'))
            continue
        image_path = _listed_file(root, entry["image"], where, "image", problems)
        label_path = _listed_file(root, label, where, "label", problems) if label is not None else None
        if image_path is not None and (label is None or label_path is not None):
            cases.append(CaseFiles(_case_id(image_path), (image_path,), label_path, packed))
    return tuple(cases)


def _parse_test(root: Path, json_path: Path, raw: Any, packed: int, problems: Problems) -> tuple[CaseFiles, ...]:
    if not isinstance(raw, list):
        problems.append((str(json_path), f'"test" must be a list of image paths, got {raw!r}'))
        return ()
    cases = []
    for index, entry in enumerate(raw):
        listed = entry.get("image") if isinstance(entry, dict) else entry
        if not isinstance(listed, str):
            problems.append((str(json_path), f"test[{index}] must be an image path, got {entry!r}"))
            continue
        image_path = _listed_file(root, listed, f"test[{index}]", "image", problems)
        if image_path is not None:
            cases.append(CaseFiles(_case_id(image_path), (image_path,), None, packed))
    return tuple(cases)


def _listed_file(root: Path, listed: str, where: str, what: str, problems: Problems) -> Path | None:
    path = root / listed
    outside = _outside_reason(root, listed)
    if outside is not None:
        problems.append((str(root / "dataset.json"), f"{where} {what} {listed!r} {outside}"))
        return None
    if nifti_ending(path) is None:
        problems.append(
            (str(path), f"{what} listed in dataset.json {where} is not a NIfTI file (use one of {SUPPORTED_ENDINGS})")
        )
        return None
    reason = unreadable_reason(path)
    if reason == "file does not exist":
        problems.append((str(path), f"{what} listed in dataset.json {where} does not exist"))
        return None
    if reason is not None:
        problems.append((str(path), f"{what} listed in dataset.json {where}: {reason}"))
        return None
    return path


def _outside_reason(root: Path, listed: str) -> str | None:
    """Why an entry of ``dataset.json`` points outside the dataset folder, or None (see the module doc)."""
    entry = Path(listed)
    if entry.is_absolute():
        return "is an absolute path; entries must be relative to the dataset folder"
    if ".." not in entry.parts:
        return None  # only symlinks placed inside the folder can lead elsewhere, and those are followed
    try:
        target = (root / entry).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        return f"cannot be resolved ({exc}); entries must be plain paths inside the dataset folder"
    if not target.is_relative_to(root.resolve()):
        return f"resolves to {target}, outside the dataset folder {root}; entries must stay inside it"
    return None


def _scan_extra(folder: Path, packed: int, problems: Problems) -> tuple[CaseFiles, ...]:
    if not folder.is_dir():
        problems.append((str(folder), "extra unlabelled folder is missing"))
        return ()
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        problems.append((str(folder), f"cannot list folder: {os_error_reason(folder, exc)}"))
        return ()
    paths = [path for path in entries if not path.name.startswith(".") and nifti_ending(path) is not None]
    for path in paths:
        reason = unreadable_reason(path)
        if reason is not None:
            problems.append((str(path), reason))
    cases = tuple(CaseFiles(_case_id(path), (path,), None, packed) for path in paths)
    if not cases:
        problems.append((str(folder), "no unlabelled images found (expected files like CASE.nii.gz)"))
    return cases


def _case_id(path: Path) -> str:
    return path.name[: -len(nifti_ending(path) or "")]
