"""Write a dataset in the nnU-Net v2 raw layout: its cases' NIfTI files and ``dataset.json``.

The phantom generator (:mod:`semiseg.data.phantom`) and tests write datasets with these;
every file is written atomically, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from semiseg.data.dataset import CaseFiles
from semiseg.data.nifti import save_nifti


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
        save_nifti(np.asarray(data, dtype=np.float32), affine, path)
        image_paths.append(path)
    label_path = None
    if label is not None:
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        label_path = root / "labelsTr" / f"{case_id}.nii.gz"
        save_nifti(np.asarray(label).astype(np.int16), affine, label_path)
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
