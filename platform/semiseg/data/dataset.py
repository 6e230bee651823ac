"""What a dataset is, whatever its layout on disk, and the checks both layout readers share.

A dataset is a :class:`DatasetLayout`: its declared channels and labels and its cases'
files (:class:`CaseFiles`); :class:`LoadedCase` is one case's voxels. The nnU-Net v2 reader
(:mod:`semiseg.data.layout`) and the Decathlon reader (:mod:`semiseg.data.msd`) both return a
:class:`DatasetLayout`, and :func:`semiseg.data.formats.read_dataset` picks the reader.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.data.errors import DatasetError, Problems


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
    """A dataset as found on disk, in the nnU-Net v2 raw or the Decathlon layout.

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
