"""Scores of a folder of predicted label maps against a folder of reference label maps.

This is ``semiseg-evaluate``'s work (the command line is in :mod:`semiseg.inference.evaluate_cli`):
predictions and references are paired by case id (``{case}.nii.gz`` or ``{case}.nii``), every case
is scored per class with :func:`semiseg.metrics.multiclass_metrics` (the training code's metrics and
empty-mask policy; distances in mm from each file's affine), and the scores are summarised per
class and over classes into a ``summary.json``. Every problem (a case without its partner, a shape
or affine mismatch, an undeclared label value, an unreadable file) is one line of a
:class:`~semiseg.data.errors.DatasetError` naming the file, all of them reported at once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from semiseg.data.errors import DatasetError, Problems
from semiseg.data.nifti import SUPPORTED_ENDINGS, nifti_ending
from semiseg.data.preprocess import spacing_of
from semiseg.metrics import ALL_METRICS, DEFAULT_NSD_TOLERANCE_MM, multiclass_metrics, summarize

SUMMARY_FILE = "summary.json"
AFFINE_TOLERANCE = 1e-3
"""Largest absolute difference between a prediction's and its reference's affine entries (mm)."""

METRIC_DEFINITIONS: dict[str, str] = {
    "dice": "2TP / (2TP + FP + FN), one class against the rest",
    "jaccard": "TP / (TP + FP + FN)",
    "precision": "TP / (TP + FP)",
    "recall": "TP / (TP + FN)",
    "specificity": "TN / (TN + FP)",
    "accuracy": "(TP + TN) / all voxels",
    "hd95": "95th percentile of the union of both directed distance sets between the boundary voxels "
            "of prediction and reference, in mm (MedPy / nnU-Net definition)",
    "asd": "mean of the union of both directed boundary-voxel distance sets, in mm",
    "nsd": "normalised surface Dice: fraction of both boundaries (boundary voxels) lying within "
           "nsd_tolerance_mm of the other boundary",
    "spacing": "voxel size from each file's affine (norms of its first three columns), in mm",
    "empty masks": "a class absent from both prediction and reference: every metric null for that case "
                   "and left out of all means; a class in only one of them: dice, jaccard and nsd 0, "
                   "hd95 and asd null, and that case's mean over classes of hd95 and asd null",
    "means": "per class and over classes, over cases, nulls left out; *_std is the sample standard "
             "deviation (ddof 1, null with fewer than two values); *_nan_cases counts the nulls",
}


@dataclass(frozen=True)
class CasePair:
    """A prediction and the reference it is scored against."""

    case_id: str
    prediction: Path
    reference: Path


@dataclass(frozen=True)
class LabelSet:
    """What is evaluated and what may appear in the label maps.

    Attributes:
        names: foreground class id -> label name, the classes scored (in this order).
        allowed: every value a label map may hold (background 0 and every declared class).
        source: where the labels come from, for error messages (``"dataset.json F"``, ...).
    """

    names: dict[int, str]
    allowed: frozenset[int]
    source: str


def case_files(folder: Path, role: str) -> tuple[dict[str, Path], Problems]:
    """The NIfTI files of ``folder`` by case id (the name without ``.nii.gz`` / ``.nii``).

    Args:
        folder: a folder of ``{case}.nii.gz`` or ``{case}.nii`` files; other files are ignored.
        role: ``"prediction"`` or ``"reference"``, for messages.

    Returns:
        case id -> file, and the problems found (the folder is missing, or a case has both endings).
    """
    if not folder.is_dir():
        return {}, [(str(folder), f"the {role} folder does not exist or is not a folder")]
    files: dict[str, Path] = {}
    problems: Problems = []
    for path in sorted(folder.iterdir()):
        ending = nifti_ending(path)
        if ending is None or path.is_dir():
            continue
        case_id = path.name[: -len(ending)]
        if case_id in files:
            problems.append((str(path), f"case {case_id!r} has two {role} files: {files[case_id].name} and "
                                        f"{path.name}; keep one"))
            continue
        files[case_id] = path
    if not files and not problems:
        problems.append((str(folder), f"no {role} files ({' or '.join(SUPPORTED_ENDINGS)}) in this folder"))
    return files, problems


def pair_cases(pred_dir: Path, ref_dir: Path) -> list[CasePair]:
    """Pair each prediction with the reference of the same case id.

    Args:
        pred_dir: folder of predicted label maps.
        ref_dir: folder of reference label maps.

    Returns:
        The pairs, sorted by case id.

    Raises:
        DatasetError: one line per problem: a reference without prediction, a prediction without
            reference (each naming the case id), a missing folder, a case with two files.
    """
    predictions, problems = case_files(Path(pred_dir), "prediction")
    references, ref_problems = case_files(Path(ref_dir), "reference")
    problems += ref_problems
    if problems:
        raise DatasetError(problems)
    for case_id in sorted(references.keys() - predictions.keys()):
        problems.append((str(references[case_id]), f"case {case_id!r} has a reference but no prediction in {pred_dir}"))
    for case_id in sorted(predictions.keys() - references.keys()):
        problems.append((str(predictions[case_id]), f"case {case_id!r} has a prediction but no reference in {ref_dir}"))
    if problems:
        raise DatasetError(problems)
    return [CasePair(c, predictions[c], references[c]) for c in sorted(predictions)]


def labels_from_dataset_json(path: Path) -> dict[int, str]:
    """Class id -> label name from an nnU-Net ``dataset.json``'s ``"labels"`` (name -> value).

    Args:
        path: the ``dataset.json`` file.

    Returns:
        Every declared label, background included.

    Raises:
        DatasetError: the file cannot be read or parsed, has no ``"labels"`` mapping, or a label's
            value is not an integer (region-based labels are not supported), or two names share a value.
    """
    try:
        meta = json.loads(Path(path).read_text())
    except OSError as exc:
        raise DatasetError.single(path, f"cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise DatasetError.single(path, f"not valid JSON: {exc}") from None
    raw = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise DatasetError.single(path, f'"labels" must map label names to integer values, got {raw!r}')
    problems: Problems = []
    labels: dict[int, str] = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append((str(path), f"label {name!r} has value {value!r}; only integer labels are supported "
                                        "(region-based labels are not)"))
        elif value in labels:
            problems.append((str(path), f"labels {labels[value]!r} and {name!r} share the value {value}"))
        else:
            labels[value] = str(name)
    if problems:
        raise DatasetError(problems)
    return labels


def parse_label_ids(text: str) -> list[int]:
    """Class ids from ``"1,2,3"``.

    Raises:
        ValueError: an entry is not a non-negative integer, or an id repeats.
    """
    ids = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"--labels must be comma-separated non-negative integers like 1,2,3; got {text!r}")
        ids.append(int(part))
    if len(set(ids)) != len(ids):
        raise ValueError(f"--labels repeats a class id: {text!r}")
    return ids


def resolve_labels(pairs: Sequence[CasePair], dataset_json: Path | None = None,
                   label_ids: Sequence[int] | None = None, num_processes: int = 1) -> LabelSet:
    """The classes to evaluate: from ``dataset_json``, else ``label_ids``, else the references.

    With both ``dataset_json`` and ``label_ids``, the ids select a subset of the declared labels.
    Background 0 is never evaluated.

    Raises:
        DatasetError: unreadable ``dataset_json``, an id of ``label_ids`` it does not declare,
            unreadable references, or no foreground class at all.
    """
    if dataset_json is not None:
        declared = labels_from_dataset_json(dataset_json)
        source = f"dataset.json {dataset_json}"
        if label_ids is not None:
            missing = sorted(set(label_ids) - set(declared))
            if missing:
                raise DatasetError.single(dataset_json, f"does not declare the class ids {missing} given by --labels")
            names = {c: declared[c] for c in label_ids if c != 0}
        else:
            names = {c: n for c, n in sorted(declared.items()) if c != 0}
        allowed = frozenset(declared) | {0}
    elif label_ids is not None:
        names = {c: str(c) for c in label_ids if c != 0}
        allowed = frozenset(names) | {0}
        source = "--labels (to score a subset of the labels, declare them all with --dataset-json)"
    else:
        values = _map(_label_values, [p.reference for p in pairs], num_processes)
        problems = [problem for found, problem in values if problem is not None]
        if problems:
            raise DatasetError(problems)
        present = sorted(set().union(*(found for found, _ in values)) - {0})
        names = {c: str(c) for c in present}
        allowed = frozenset(present) | {0}
        source = "the values present in the references"
    if not names:
        raise DatasetError.single(dataset_json or "labels", f"no foreground class to evaluate (from {source})")
    return LabelSet(names, allowed, source)


def evaluate_folder(pred_dir: Path, ref_dir: Path, *, dataset_json: Path | None = None,
                    label_ids: Sequence[int] | None = None,
                    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                    num_processes: int = 1) -> dict[str, Any]:
    """Score every prediction of ``pred_dir`` against its reference in ``ref_dir``.

    Args:
        pred_dir: folder of predicted label maps (``{case}.nii.gz`` / ``.nii``).
        ref_dir: folder of reference label maps with the same case ids.
        dataset_json: nnU-Net ``dataset.json`` whose ``"labels"`` give class ids and names.
        label_ids: class ids to evaluate (names are the ids unless ``dataset_json`` names them).
        nsd_tolerance_mm: tolerance of the normalised surface Dice, in mm.
        num_processes: cases scored in parallel (1: in this process).

    Returns:
        The summary (see :func:`summary_of`), NaN as float NaN.

    Raises:
        DatasetError: every problem found, one line each naming the file.
    """
    pairs = pair_cases(Path(pred_dir), Path(ref_dir))
    labels = resolve_labels(pairs, dataset_json, label_ids, num_processes)
    score = partial(score_case, labels=labels, nsd_tolerance_mm=nsd_tolerance_mm)
    results = _map(score, pairs, num_processes)
    problems = [problem for result in results for problem in result.get("problems", [])]
    if problems:
        raise DatasetError(problems)
    return summary_of(results, labels, nsd_tolerance_mm)


def score_case(pair: CasePair, labels: LabelSet, nsd_tolerance_mm: float) -> dict[str, Any]:
    """Per-class metrics of one case, or the problems that prevent them.

    Returns:
        ``{"case_id", "prediction", "reference", "metrics": {label name: {metric: value}},
        "mean": {metric: mean over classes}}``, or ``{"problems": [(path, message), ...]}``.
    """
    prediction, problems = read_label_map(pair.prediction)
    reference, ref_problems = read_label_map(pair.reference)
    problems += ref_problems
    if prediction is None or reference is None:
        return {"problems": problems}
    (pred, pred_affine), (ref, ref_affine) = prediction, reference
    if pred.shape != ref.shape:
        problems.append((str(pair.prediction), f"shape {pred.shape} differs from the shape {ref.shape} of its "
                                               f"reference {pair.reference}"))
    if not np.allclose(pred_affine, ref_affine, atol=AFFINE_TOLERANCE):
        problems.append((str(pair.prediction), f"affine {_affine_text(pred_affine)} differs from the affine "
                                               f"{_affine_text(ref_affine)} of its reference {pair.reference}"))
    for path, data in ((pair.prediction, pred), (pair.reference, ref)):
        undeclared = sorted(set(np.unique(data).tolist()) - labels.allowed)
        if undeclared:
            problems.append((str(path), f"label values {undeclared} are not among the class ids "
                                        f"{sorted(labels.allowed - {0})} (and background 0) of {labels.source}"))
    if problems:
        return {"problems": problems}
    spacing = spacing_of(ref_affine)[: ref.ndim]
    values = multiclass_metrics(pred, ref, spacing, list(labels.names), nsd_tolerance_mm=nsd_tolerance_mm)
    return {
        "case_id": pair.case_id,
        "prediction": str(pair.prediction),
        "reference": str(pair.reference),
        "metrics": {name: {m: values[f"{m}/{c}"] for m in ALL_METRICS} for c, name in labels.names.items()},
        "mean": {m: values[m] for m in ALL_METRICS},
    }


def read_label_map(path: Path) -> tuple[tuple[np.ndarray, np.ndarray] | None, Problems]:
    """An integer label map (2D or 3D; a trailing axis of length 1 is dropped) and its affine.

    Returns:
        ``((labels int64, affine 4x4), [])``, or ``(None, [(path, why)])`` when the file cannot be
        read, has more than 3 dimensions, or holds values that are not integers.
    """
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for a corrupt or foreign file
        return None, [(str(path), f"not a readable NIfTI file: {exc}")]
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        return None, [(str(path), f"a label map must be 2D or 3D, got shape {data.shape}")]
    if np.issubdtype(data.dtype, np.floating):
        bad = data[~np.isfinite(data) | (data != np.round(data))]
        if bad.size:
            return None, [(str(path), f"holds values that are not integer class ids, e.g. {float(bad.flat[0])}")]
    elif not (np.issubdtype(data.dtype, np.integer) or data.dtype == bool):
        return None, [(str(path), f"data type {data.dtype} is not a label map's (integers expected)")]
    return (data.astype(np.int64), affine), []


def summary_of(results: Sequence[Mapping[str, Any]], labels: LabelSet, nsd_tolerance_mm: float) -> dict[str, Any]:
    """The summary of scored cases.

    Returns:
        ``{"metric_definitions", "nsd_tolerance_mm", "labels": {id: name}, "n_cases", "per_case": [...],
        "mean_per_class": {name: {metric, metric_std, metric_nan_cases}}, "mean_over_classes": {...}}``;
        means are over cases (NaN left out), ``_std`` the sample standard deviation (ddof 1).
    """
    per_case = [dict(r) for r in results]
    mean_per_class = {name: _without_count(summarize([r["metrics"][name] for r in per_case]))
                      for name in labels.names.values()}
    return {
        "metric_definitions": METRIC_DEFINITIONS,
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "labels": {str(c): name for c, name in labels.names.items()},
        "n_cases": len(per_case),
        "per_case": per_case,
        "mean_per_class": mean_per_class,
        "mean_over_classes": _without_count(summarize([r["mean"] for r in per_case])),
    }


def write_summary(summary: Mapping[str, Any], path: Path) -> None:
    """Write ``summary`` as JSON with NaN and infinities as ``null`` (valid JSON)."""
    Path(path).write_text(json.dumps(_json_ready(summary), indent=2, allow_nan=False) + "\n")


def format_table(summary: Mapping[str, Any]) -> str:
    """Per-class mean Dice, HD95 and NSD (and over classes) as a small text table."""
    tolerance = summary["nsd_tolerance_mm"]
    rows = [(name, values) for name, values in summary["mean_per_class"].items()]
    rows.append(("mean over classes", summary["mean_over_classes"]))
    width = max(len(name) for name, _ in rows)
    header = f"{'class':<{width}}  {'Dice':>14}  {'HD95 (mm)':>14}  {f'NSD@{tolerance:g}mm':>14}"
    lines = [header, "-" * len(header)]
    for name, values in rows:
        cells = [_cell(values, m) for m in ("dice", "hd95", "nsd")]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>14}" for c in cells))
    lines.append(f"({summary['n_cases']} cases; 'n NaN' = cases left out of a mean)")
    return "\n".join(lines)


def _cell(values: Mapping[str, Any], metric: str) -> str:
    mean = values.get(metric, math.nan)
    text = "-" if mean is None or math.isnan(mean) else f"{mean:.4f}"
    nan_cases = int(values.get(f"{metric}_nan_cases", 0))
    return f"{text} ({nan_cases} NaN)" if nan_cases else text


def _without_count(summary: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in summary.items() if k != "n_cases"}


def _label_values(path: Path) -> tuple[set[int], tuple[str, str] | None]:
    """The values of one label map, or the problem reading it."""
    read, problems = read_label_map(path)
    if read is None:
        return set(), problems[0]
    return set(np.unique(read[0]).tolist()), None


def _map(function, items: Sequence[Any], num_processes: int) -> list[Any]:
    """``[function(item) for item in items]``, in a pool of ``num_processes`` processes when > 1."""
    workers = min(num_processes, len(items))
    if workers <= 1:
        return [function(item) for item in items]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(function, items))


def _affine_text(affine: np.ndarray) -> str:
    return json.dumps(np.round(np.asarray(affine, dtype=float), 4).tolist())


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def default_num_processes() -> int:
    """``min(4, number of CPUs)``."""
    return max(1, min(4, os.cpu_count() or 1))
