"""Whole-case inference and per-case metrics in millimetres."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from semiseg.data.prepared import EvalCase, to_slices
from semiseg.metrics import DEFAULT_NSD_TOLERANCE_MM, DISTANCE_METRICS, multiclass_metrics, summarize
from semiseg.train.sliding_window import sliding_window_inference


@torch.no_grad()
def predict_case(model: nn.Module, image: np.ndarray, dims: int, batch_size: int,
                 device: torch.device | str = "cpu", amp: bool = False,
                 patch_size: Sequence[int] | None = None, overlap: float = 0.5) -> np.ndarray:
    """Predict the label map of a whole case.

    Args:
        model: network in eval mode returning logits.
        image: ``[C, X, Y, Z]``.
        dims: 2 (slice by slice along Z, re-stacked into the volume) or 3 (whole volume,
            or sliding windows of ``patch_size`` with ``overlap``).
        batch_size: slices (or 3D tiles) per forward pass.
        device: where to run.
        amp: autocast on CUDA.

    Returns:
        ``[X, Y, Z]`` int64 labels.
    """
    device = torch.device(device)
    if dims == 3 and patch_size:
        probs = sliding_window_inference(model, image, patch_size, overlap=overlap, batch_size=batch_size,
                                         device=device, amp=amp)
        return probs.argmax(0).cpu().numpy().astype(np.int64)
    with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
        if dims == 3:
            logits = model(torch.from_numpy(image[None]).to(device))
            return logits.argmax(1)[0].cpu().numpy().astype(np.int64)
        slices = torch.from_numpy(to_slices(image))
        predictions = [model(slices[i:i + batch_size].to(device)).argmax(1).cpu()
                       for i in range(0, len(slices), batch_size)]
    return np.moveaxis(torch.cat(predictions).numpy(), 0, -1).astype(np.int64)


def evaluate_cases(model: nn.Module, cases: Sequence[EvalCase], class_ids: Sequence[int], dims: int,
                   batch_size: int, device: torch.device | str = "cpu", amp: bool = False,
                   patch_size: Sequence[int] | None = None, overlap: float = 0.5, *,
                   nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> list[dict]:
    """Per-case metrics (Dice, Jaccard, ..., HD95 and ASD in mm, NSD) of ``model`` on ``cases``.

    Args:
        nsd_tolerance_mm: tolerance of the normalised surface Dice, in mm.

    Returns:
        One dict per case with ``case_id`` and the metrics of
        :func:`semiseg.metrics.multiclass_metrics` over the foreground classes.
    """
    was_training = model.training
    model.eval()
    foreground = [c for c in class_ids if c != 0]
    results = []
    try:
        for case in cases:
            prediction = predict_case(model, case.image, dims, batch_size, device, amp, patch_size, overlap)
            metrics = multiclass_metrics(prediction, case.label, case.spacing, foreground,
                                         nsd_tolerance_mm=nsd_tolerance_mm)
            results.append({"case_id": case.case_id, **metrics})
    finally:
        model.train(was_training)
    return results


_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9_\-. ]")


def metric_safe_name(name: str) -> str:
    """``name`` usable as one part of an MLflow metric name: every character other than an ASCII
    letter, a digit, ``_``, ``-``, ``.`` or a space becomes ``_``."""
    return _UNSAFE_NAME_CHARACTERS.sub("_", name)


def class_metric_names(class_ids: Sequence[str], label_names: Mapping[int, str] | None) -> dict[str, str]:
    """The name each class gets in per-class metric names.

    Args:
        class_ids: class ids as they appear in per-case keys (``"1"``, ``"2"``, ...).
        label_names: class id -> label name (e.g. ``PreparedData.label_names``); a class without a
            name (or without this mapping) is named by its id.

    Returns:
        class id text -> :func:`metric_safe_name` of its label name; names that would coincide after
        that are made unique by appending ``_<class id>``.
    """
    names = {int(k): str(v) for k, v in (label_names or {}).items()}
    safe = {cid: metric_safe_name(names.get(int(cid), cid) if cid.isdigit() else cid) for cid in class_ids}
    taken = list(safe.values())
    return {cid: f"{name}_{cid}" if taken.count(name) > 1 else name for cid, name in safe.items()}


def summarise_cases(per_case: Sequence[dict], prefix: str,
                    label_names: Mapping[int, str] | None = None) -> dict[str, float]:
    """Means over cases of the case metrics and of each class's metrics (NaN ignored, and counted).

    Args:
        per_case: dicts from :func:`evaluate_cases`: ``case_id``, ``<metric>`` (the case's mean over
            classes) and ``<metric>/<class id>``.
        prefix: e.g. ``"val"`` or ``"test"``.
        label_names: class id -> label name (background may be included); see
            :func:`class_metric_names`.

    Returns:
        ``{prefix}/{metric}``: mean over cases of the case means; ``{prefix}/{metric}/{label}``: mean
        over cases of that class's value. ``{prefix}/{metric}_nan_cases`` and
        ``{prefix}/{metric}/{label}_nan_cases``: the number of cases where the value is NaN (a class
        missed entirely makes HD95/ASD NaN; a class absent from both prediction and reference makes
        all of its metrics NaN), always present for HD95 and ASD and present for the other metrics
        when some case is NaN (absent means 0). Empty when there are no cases.
    """
    numeric = [{k: float(v) for k, v in case.items() if k != "case_id"} for case in per_case]
    if not numeric:
        return {}
    summary = summarize(numeric)
    keys = [k for k in summary if k != "n_cases" and not k.endswith(("_std", "_nan_cases"))]
    class_keys = [k for k in keys if "/" in k]
    names = class_metric_names(list(dict.fromkeys(k.split("/", 1)[1] for k in class_keys)), label_names)
    out: dict[str, float] = {}
    nan_counts: dict[str, float] = {}
    for key in [k for k in keys if "/" not in k] + class_keys:
        metric, _, cid = key.partition("/")
        name = f"{prefix}/{metric}/{names[cid]}" if cid else f"{prefix}/{metric}"
        out[name] = float(summary[key])
        nan_cases = summary[f"{key}_nan_cases"]
        if metric in DISTANCE_METRICS or nan_cases > 0:
            nan_counts[f"{name}_nan_cases"] = float(nan_cases)
    out.update(nan_counts)
    return out
