"""Lovász-softmax loss (Berman, Rannen Triki & Blaschko, CVPR 2018).

"The Lovász-Softmax loss: a tractable surrogate for the optimization of the
intersection-over-union measure in neural networks". For each class c the voxel
errors m_i = |𝟙(y_i = c) − p_i^c| are sorted in decreasing order and combined with the
gradient of the Jaccard loss Δ_J along that order,

    loss_c = Σ_i m_(i) · (Δ_J({1..i}) − Δ_J({1..i−1})),
    Δ_J(S) = |S| / |{y = c} ∪ S|,

the Lovász extension of Δ_J evaluated at m (exact for hard predictions: 1 − IoU). The
loss averages loss_c over the classes. Voxels are flattened, so 2D and 3D batches are
handled alike. Pure torch, following the authors' reference implementation, vectorised
over classes.
"""

from __future__ import annotations

import torch

CLASS_SELECTIONS = ("present", "all")


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss along sorted errors.

    Args:
        gt_sorted: ``[N, K]`` float ground-truth indicators of K classes, each column
            ordered by decreasing error.

    Returns:
        ``[N, K]`` weights Δ_J({1..i}) − Δ_J({1..i−1}) per column.
    """
    totals = gt_sorted.sum(dim=0, keepdim=True)
    intersection = totals - gt_sorted.cumsum(dim=0)
    union = totals + (1.0 - gt_sorted).cumsum(dim=0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], dim=0)


def _lovasz_flat(probs: torch.Tensor, labels: torch.Tensor, classes: str) -> torch.Tensor:
    """Lovász-softmax of flattened ``probs`` ``[N, C]`` against ``labels`` ``[N]``."""
    num_classes = probs.shape[1]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    foreground = (labels.unsqueeze(1) == torch.arange(num_classes, device=labels.device)).to(probs.dtype)
    errors = (foreground - probs).abs()
    errors_sorted, order = errors.sort(dim=0, descending=True)
    per_class = (errors_sorted * lovasz_grad(foreground.gather(0, order))).sum(dim=0)
    if classes == "all":
        return per_class.mean()
    present = foreground.sum(dim=0) > 0
    if not bool(present.any()):
        return probs.sum() * 0.0
    return per_class[present].mean()


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, classes: str = "present",
                   per_image: bool = False, ignore_index: int | None = None) -> torch.Tensor:
    """Multi-class Lovász-softmax loss of probabilities against integer labels.

    Args:
        probs: ``[B, C, *spatial]`` class probabilities (softmax outputs), 2D or 3D.
        labels: ``[B, *spatial]`` integer classes (hard pseudo-labels or ground truth).
        classes: ``present`` averages over the classes present in the labels (the
            reference default), ``all`` over every class.
        per_image: compute the loss per sample and average, instead of over the batch.
        ignore_index: label value whose voxels are left out.

    Returns:
        Scalar loss in [0, 1]; 0 for a perfect one-hot prediction.

    Raises:
        ValueError: unknown ``classes`` or mismatched shapes.
    """
    if classes not in CLASS_SELECTIONS:
        raise ValueError(f"classes must be one of {CLASS_SELECTIONS}, got {classes!r}")
    if probs.shape[0] != labels.shape[0] or probs.shape[2:] != labels.shape[1:]:
        raise ValueError(f"probabilities {tuple(probs.shape)} and labels {tuple(labels.shape)} do not match")
    if per_image:
        losses = [lovasz_softmax(p.unsqueeze(0), y.unsqueeze(0), classes, False, ignore_index)
                  for p, y in zip(probs, labels)]
        return torch.stack(losses).mean()
    flat_probs = probs.float().movedim(1, -1).reshape(-1, probs.shape[1])
    flat_labels = labels.reshape(-1)
    if ignore_index is not None:
        keep = flat_labels != ignore_index
        flat_probs, flat_labels = flat_probs[keep], flat_labels[keep]
    return _lovasz_flat(flat_probs, flat_labels, classes)
