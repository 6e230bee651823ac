"""Whole-case inference and per-case metrics in millimetres."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from semiseg.data.prepared import EvalCase, to_slices
from semiseg.metrics import multiclass_metrics, summarize
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
                   patch_size: Sequence[int] | None = None, overlap: float = 0.5) -> list[dict]:
    """Per-case metrics (Dice, Jaccard, ..., HD95 and ASD in mm) of ``model`` on ``cases``.

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
            metrics = multiclass_metrics(prediction, case.label, case.spacing, foreground)
            results.append({"case_id": case.case_id, **metrics})
    finally:
        model.train(was_training)
    return results


def summarise_cases(per_case: Sequence[dict], prefix: str) -> dict[str, float]:
    """Mean metrics over cases as ``{prefix}/dice``, ``{prefix}/hd95``, ... (NaN ignored).

    The number of cases whose HD95 is undefined (one mask empty) is reported as
    ``{prefix}/hd95_nan_cases`` so that ignored cases are visible.
    """
    numeric = [{k: v for k, v in case.items() if k != "case_id" and "/" not in k} for case in per_case]
    summary = summarize(numeric)
    out = {f"{prefix}/{k}": float(summary[k]) for k in numeric[0]} if numeric else {}
    for key in ("hd95", "asd"):
        if f"{key}_nan_cases" in summary:
            out[f"{prefix}/{key}_nan_cases"] = float(summary[f"{key}_nan_cases"])
    return out
