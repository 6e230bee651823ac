"""Per-case segmentation metrics on whole 2D/3D volumes, distances in millimetres.

All metrics are computed on one case (one whole volume) at a time, from boolean
masks (``binary_metrics``) or integer label maps (``multiclass_metrics``).
Surface distances respect the voxel spacing, so they are reported in the
physical unit of the spacing (normally mm).

Overlap metrics (from the voxel counts TP, FP, FN, TN; N = TP + FP + FN + TN):

* dice        = 2 TP / (2 TP + FP + FN)
* jaccard     = TP / (TP + FP + FN)
* precision   = TP / (TP + FP)
* recall      = TP / (TP + FN)
* specificity = TN / (TN + FP)
* accuracy    = (TP + TN) / N

A ratio whose denominator is 0 is NaN, except where the empty-mask policy below
says otherwise.

Surface metrics:

* The surface of a mask is its set of boundary voxels: ``mask XOR
  binary_erosion(mask)`` with the connectivity-1 (face-neighbour) structuring
  element and ``border_value=0``, so mask voxels on the array border are
  surface voxels.
* For each surface voxel of A, the distance to the nearest surface voxel of B
  is read from ``scipy.ndimage.distance_transform_edt(~surface_B,
  sampling=spacing)``, and vice versa; these are the two directed distance
  sets d(A->B) and d(B->A), in mm.
* ``hd95`` is the 95th percentile (numpy's default linear interpolation) of the
  UNION of both directed distance sets, i.e.
  ``np.percentile(np.concatenate([d_ab, d_ba]), 95)``. This is the MedPy
  ``hd95`` definition, which nnU-Net uses. (MONAI instead takes the maximum of
  the two directed 95th percentiles; that value is greater than or equal to
  the one computed here.)
* ``asd`` is the average symmetric surface distance: the mean of the union of
  both directed distance sets (MedPy's ``assd`` is the mean of the two directed
  means, which differs when the surfaces have different sizes).
* ``nsd`` is the normalised surface Dice at a tolerance ``tol`` mm (Nikolov et
  al. 2021, "Clinically applicable segmentation of head and neck anatomy for
  radiotherapy"; MONAI's ``compute_surface_dice``): the fraction of both
  surfaces lying within ``tol`` of the other surface,
  ``(|{a in S_A: d(a, S_B) <= tol}| + |{b in S_B: d(b, S_A) <= tol}|) /
  (|S_A| + |S_B|)``, from the same surfaces and distance sets as hd95/asd. This
  is the voxel-surface variant (every boundary voxel counts 1, as in MONAI),
  not DeepMind's ``surface-distance`` package, which weights surface elements
  by their area; the two agree closely on smooth shapes, not exactly. The
  comparison is ``<=`` with no epsilon: a distance of exactly ``tol`` counts.

Empty-mask policy (``EmptyMaskPolicy``; module default ``DEFAULT_EMPTY_POLICY``).
A metric is never silently set to 0 because a mask is empty.

``binary_metrics`` (one mask pair, e.g. binary tasks):

* Both pred and target empty (perfect agreement on absence):
  dice = jaccard = precision = recall = nsd = 1.0 and hd95 = asd = 0.0
  (``both_empty_overlap`` and ``both_empty_distance``). Specificity and
  accuracy follow their definitions (both 1.0).
* Exactly one of pred and target empty: dice = jaccard = nsd = 0.0. Precision
  and recall follow their definitions where defined and are NaN where the
  denominator is 0 (pred empty -> precision NaN, recall 0.0; target empty ->
  precision 0.0, recall NaN). hd95 and asd are undefined (a distance to an empty
  set): with ``empty_distance="nan"`` (the default) they are NaN; with
  ``empty_distance="max"`` they are the diagonal of the volume's physical
  extent, ``sqrt(sum((shape_i * spacing_i) ** 2))`` mm, an upper bound on any
  distance inside the volume, usable as a penalty. They are never 0.
* specificity is NaN when TN + FP = 0 (the target fills the whole volume).

``multiclass_metrics`` (label maps; what training, validation and
``semiseg-evaluate`` use) differs from ``binary_metrics`` in two places:

* A class absent from BOTH prediction and reference in a case is NaN for every
  metric of that class in that case (nnU-Net's policy), not Dice 1: it is left
  out of the case's mean over classes and out of per-class means over cases,
  so cases without a structure neither inflate nor deflate its score. When
  every class of a case is absent from both, the case's over-class means are
  NaN.
* A class present in only one of prediction and reference (missed entirely, or
  predicted where there is none) has dice = jaccard = nsd = 0, which counts in
  the mean over classes, and hd95 = asd = NaN (under ``empty_distance="nan"``).
  The case's over-class mean of hd95 and asd is then NaN too, rather than a
  mean over the remaining classes that would hide the miss; so the case shows
  up in the ``hd95_nan_cases`` / ``asd_nan_cases`` counts of ``summarize``.
  (Under ``empty_distance="max"`` the class's penalty distance counts in the
  mean instead.)
  The other over-class means (dice, precision, recall, ...) ignore NaN entries
  (e.g. the precision of a class that was not predicted).

``summarize`` / ``MetricAccumulator`` aggregate per-case dicts into a mean and
a sample standard deviation (ddof=1) per metric, ignoring NaN, and count the
NaN cases.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

__all__ = [
    "ALL_METRICS",
    "DEFAULT_EMPTY_POLICY",
    "DEFAULT_NSD_TOLERANCE_MM",
    "DISTANCE_METRICS",
    "OVERLAP_METRICS",
    "SURFACE_METRICS",
    "EmptyMaskPolicy",
    "MetricAccumulator",
    "binary_metrics",
    "multiclass_metrics",
    "summarize",
    "volume_diagonal",
]

DISTANCE_METRICS: tuple[str, ...] = ("hd95", "asd")
"""Surface metrics that are distances in mm (undefined when one mask is empty)."""
SURFACE_METRICS: tuple[str, ...] = DISTANCE_METRICS + ("nsd",)
"""Metrics computed from the two surfaces: the distances and the normalised surface Dice."""
OVERLAP_METRICS: tuple[str, ...] = (
    "dice",
    "jaccard",
    "precision",
    "recall",
    "specificity",
    "accuracy",
)
ALL_METRICS: tuple[str, ...] = OVERLAP_METRICS + SURFACE_METRICS

DEFAULT_NSD_TOLERANCE_MM = 1.0
"""Default tolerance of the normalised surface Dice, in mm."""

_EMPTY_DISTANCE_CHOICES = ("nan", "max")


@dataclass(frozen=True)
class EmptyMaskPolicy:
    """How metrics are defined when pred and/or target is empty.

    Attributes:
        empty_distance: hd95/asd when exactly one mask is empty. ``"nan"``
            (default): NaN, the distance to an empty set is undefined.
            ``"max"``: the diagonal of the volume's physical extent in mm
            (see ``volume_diagonal``), a worst-case penalty.
        both_empty_overlap: dice, jaccard, precision, recall and nsd when both
            masks are empty (``binary_metrics`` only: ``multiclass_metrics``
            makes a class absent from both NaN).
        both_empty_distance: hd95 and asd when both masks are empty.
    """

    empty_distance: Literal["nan", "max"] = "nan"
    both_empty_overlap: float = 1.0
    both_empty_distance: float = 0.0

    def __post_init__(self) -> None:
        if self.empty_distance not in _EMPTY_DISTANCE_CHOICES:
            raise ValueError(
                f"empty_distance must be one of {_EMPTY_DISTANCE_CHOICES}, "
                f"got {self.empty_distance!r}"
            )


DEFAULT_EMPTY_POLICY = EmptyMaskPolicy()


def _validate_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    """Return spacing as a tuple of floats after checking length and positivity."""
    values = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=float)))
    if len(values) != ndim:
        raise ValueError(
            f"spacing has length {len(values)} but the masks have ndim {ndim}; "
            f"spacing={values}"
        )
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing values must be finite and > 0, got {values}")
    return values


def _as_binary(mask: np.ndarray, name: str) -> np.ndarray:
    """Return mask as a boolean array, rejecting values other than 0/1."""
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(
            f"{name} must be boolean or contain only 0/1; found values "
            f"{np.unique(arr)[:10].tolist()} (use multiclass_metrics for label maps)"
        )
    return arr.astype(bool)


def volume_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal length of a volume's physical extent.

    Args:
        shape: Array shape in voxels.
        spacing: Voxel size per axis (mm), same length as ``shape``.

    Returns:
        ``sqrt(sum((shape_i * spacing_i) ** 2))``: the value used for hd95/asd
        under ``EmptyMaskPolicy(empty_distance="max")``.

    Raises:
        ValueError: If ``spacing`` does not match ``shape`` or is not positive.
    """
    sp = _validate_spacing(spacing, len(shape))
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, sp))))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a boolean mask (face connectivity, array border counts)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def _directed_surface_distances(
    pred: np.ndarray, target: np.ndarray, spacing: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances pred->target and target->pred for non-empty masks.

    The computation is restricted to the bounding box of ``pred | target``
    padded by one voxel (clipped to the array): the padding voxels lie outside
    both masks, so the surfaces and the nearest-surface distances are the same
    as on the full array.
    """
    union = pred | target
    coords = np.nonzero(union)
    box = tuple(
        slice(max(int(c.min()) - 1, 0), min(int(c.max()) + 2, n))
        for c, n in zip(coords, union.shape)
    )
    surf_p = _surface(pred[box])
    surf_t = _surface(target[box])
    dist_to_t = ndimage.distance_transform_edt(~surf_t, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~surf_p, sampling=spacing)
    return dist_to_t[surf_p], dist_to_p[surf_t]


def _validate_tolerance(tolerance_mm: float) -> float:
    """Return the NSD tolerance as a float after checking it is finite and >= 0."""
    value = float(tolerance_mm)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"nsd_tolerance_mm must be finite and >= 0, got {tolerance_mm!r}")
    return value


def _ratio(num: float, den: float) -> float:
    """num / den, NaN when den is 0."""
    return float(num) / float(den) if den > 0 else math.nan


def binary_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    spacing: Sequence[float],
    *,
    empty_policy: EmptyMaskPolicy = DEFAULT_EMPTY_POLICY,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> dict[str, float]:
    """All metrics in ``ALL_METRICS`` for one binary case.

    Args:
        pred: Predicted mask, boolean or 0/1, any ndim >= 1 (2D/3D typical).
        target: Reference mask with the same shape as ``pred``.
        spacing: Voxel size per axis in mm, length ``pred.ndim``, all > 0.
        empty_policy: Values used when one or both masks are empty (see the
            module docstring).
        nsd_tolerance_mm: Tolerance of the normalised surface Dice ``nsd``,
            in the unit of ``spacing``.

    Returns:
        Dict mapping each name in ``ALL_METRICS`` to a float (possibly NaN).
        hd95/asd are in the unit of ``spacing``.

    Raises:
        ValueError: If the shapes differ, the arrays are empty (size 0), the
            masks are not binary, ``spacing`` has the wrong length or a
            non-positive value, or the tolerance is negative or not finite.
    """
    pred_arr = np.asarray(pred)
    target_arr = np.asarray(target)
    if pred_arr.shape != target_arr.shape:
        raise ValueError(
            f"pred shape {pred_arr.shape} does not match target shape {target_arr.shape}"
        )
    if pred_arr.ndim == 0 or pred_arr.size == 0:
        raise ValueError(f"masks must have ndim >= 1 and size > 0, got shape {pred_arr.shape}")
    sp = _validate_spacing(spacing, pred_arr.ndim)
    tolerance = _validate_tolerance(nsd_tolerance_mm)
    p = _as_binary(pred_arr, "pred")
    t = _as_binary(target_arr, "target")

    n = p.size
    n_pred = int(np.count_nonzero(p))
    n_target = int(np.count_nonzero(t))
    tp = int(np.count_nonzero(p & t))
    fp = n_pred - tp
    fn = n_target - tp
    tn = n - tp - fp - fn

    out: dict[str, float] = {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "jaccard": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": (tp + tn) / n,
    }

    if n_pred == 0 and n_target == 0:
        for key in ("dice", "jaccard", "precision", "recall"):
            out[key] = float(empty_policy.both_empty_overlap)
        hd95 = asd = float(empty_policy.both_empty_distance)
        nsd = float(empty_policy.both_empty_overlap)
    elif n_pred == 0 or n_target == 0:
        if empty_policy.empty_distance == "max":
            hd95 = asd = volume_diagonal(p.shape, sp)
        else:
            hd95 = asd = math.nan
        nsd = 0.0
    else:
        d_pt, d_tp = _directed_surface_distances(p, t, sp)
        both = np.concatenate([d_pt, d_tp])
        hd95 = float(np.percentile(both, 95))
        asd = float(both.mean())
        nsd = float(np.count_nonzero(both <= tolerance)) / both.size
    out["hd95"] = hd95
    out["asd"] = asd
    out["nsd"] = nsd
    return out


def _nanmean(values: Sequence[float]) -> float:
    """Mean ignoring NaN; NaN (without a warning) if all values are NaN."""
    finite = [v for v in values if not math.isnan(v)]
    return float(sum(finite) / len(finite)) if finite else math.nan


def multiclass_metrics(
    pred_labels: np.ndarray,
    target_labels: np.ndarray,
    spacing: Sequence[float],
    class_ids: Iterable[int],
    *,
    empty_policy: EmptyMaskPolicy = DEFAULT_EMPTY_POLICY,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> dict[str, float]:
    """Per-class and class-mean metrics for one case of integer label maps.

    Each class ``c`` in ``class_ids`` is evaluated one-vs-rest with
    ``binary_metrics(pred_labels == c, target_labels == c, ...)``, except that
    a class absent from both maps is NaN for every metric (see the module
    docstring's empty-mask policy).

    Args:
        pred_labels: Predicted label map (integers), any ndim >= 1.
        target_labels: Reference label map with the same shape.
        spacing: Voxel size per axis in mm, length ``pred_labels.ndim``.
        class_ids: Foreground class ids to evaluate (normally excluding the
            background 0); at least one, no duplicates.
        empty_policy: Passed to ``binary_metrics`` for every class (its
            ``both_empty_*`` values are not used here).
        nsd_tolerance_mm: Tolerance of the normalised surface Dice, in mm.

    Returns:
        Dict with ``"<metric>/<class_id>"`` for every metric in ``ALL_METRICS``
        and class, plus ``"<metric>"``: the mean over classes. For the
        distance metrics (``DISTANCE_METRICS``) that mean is NaN when any class
        present in the case has a NaN distance (a class missed entirely);
        for the other metrics NaN entries are ignored. Every mean is NaN when
        no class is present in the case.

    Raises:
        ValueError: If the shapes differ, ``spacing`` or the tolerance is
            invalid, or ``class_ids`` is empty or has duplicates.
    """
    pred_arr = np.asarray(pred_labels)
    target_arr = np.asarray(target_labels)
    if pred_arr.shape != target_arr.shape:
        raise ValueError(
            f"pred_labels shape {pred_arr.shape} does not match "
            f"target_labels shape {target_arr.shape}"
        )
    if pred_arr.ndim == 0 or pred_arr.size == 0:
        raise ValueError(f"label maps must have ndim >= 1 and size > 0, got shape {pred_arr.shape}")
    ids = [int(c) for c in class_ids]
    if not ids:
        raise ValueError("class_ids must contain at least one class id")
    if len(set(ids)) != len(ids):
        raise ValueError(f"class_ids contains duplicates: {ids}")
    _validate_spacing(spacing, pred_arr.ndim)
    _validate_tolerance(nsd_tolerance_mm)

    out: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {m: [] for m in ALL_METRICS}
    for c in ids:
        pred_c = pred_arr == c
        target_c = target_arr == c
        if pred_c.any() or target_c.any():
            res = binary_metrics(
                pred_c, target_c, spacing,
                empty_policy=empty_policy, nsd_tolerance_mm=nsd_tolerance_mm,
            )
            for m in ALL_METRICS:
                per_metric[m].append(res[m])
        else:
            res = {m: math.nan for m in ALL_METRICS}
        for m in ALL_METRICS:
            out[f"{m}/{c}"] = res[m]
    for m in ALL_METRICS:
        values = per_metric[m]
        if m in DISTANCE_METRICS and any(math.isnan(v) for v in values):
            out[m] = math.nan
        else:
            out[m] = _nanmean(values)
    return out


def summarize(per_case: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Aggregate per-case metric dicts, ignoring NaN.

    For every metric key appearing in any case (in order of first
    appearance), the result holds ``key`` (mean over non-NaN cases),
    ``key + "_std"`` (sample standard deviation, ddof=1, over non-NaN cases;
    NaN when fewer than two cases have a value) and ``key + "_nan_cases"`` (number of cases where the value is NaN
    or the key is missing). Mean and std are NaN when no case has a value.
    ``"n_cases"`` is the number of cases.

    Args:
        per_case: One dict per case, e.g. from ``binary_metrics``.

    Returns:
        The summary dict described above (counts are ints).
    """
    keys: list[str] = []
    for case in per_case:
        for k in case:
            if k not in keys:
                keys.append(k)
    out: dict[str, float] = {"n_cases": len(per_case)}
    for k in keys:
        values = np.array([float(case.get(k, math.nan)) for case in per_case])
        valid = values[~np.isnan(values)]
        out[k] = float(valid.mean()) if valid.size else math.nan
        out[f"{k}_std"] = float(valid.std(ddof=1)) if valid.size > 1 else math.nan
        out[f"{k}_nan_cases"] = int(values.size - valid.size)
    return out


class MetricAccumulator:
    """Collects per-case metric dicts and summarizes them with ``summarize``."""

    def __init__(self) -> None:
        """Start with no cases."""
        self._cases: list[dict[str, float]] = []

    def add(self, case_metrics: Mapping[str, float]) -> None:
        """Record the metrics of one case.

        Args:
            case_metrics: Metric name -> value for one case (a copy is kept).
        """
        self._cases.append(dict(case_metrics))

    @property
    def per_case(self) -> list[dict[str, float]]:
        """Copies of the recorded per-case dicts, in insertion order."""
        return [dict(c) for c in self._cases]

    def __len__(self) -> int:
        """Number of recorded cases."""
        return len(self._cases)

    def summary(self) -> dict[str, float]:
        """Summary of the recorded cases.

        Returns:
            ``summarize(self.per_case)``.
        """
        return summarize(self._cases)
