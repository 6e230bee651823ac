"""Segmentation and consistency losses shared by every method.

All functions take logits or probabilities shaped ``[B, C, *spatial]`` (2D or 3D) and
integer labels shaped ``[B, *spatial]``. An optional ``mask`` ``[B, 1, *spatial]`` (or
``[B, *spatial]``) restricts a loss to valid voxels (e.g. those an augmentation kept
inside the field of view); masked losses are averaged over the valid voxels only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semiseg.components.lovasz import lovasz_softmax
from semiseg.config import SUPERVISED_LOSSES

CONSISTENCY_LOSSES = ("mse", "bce", "kl", "symmetric_kl")


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return ``[B, C, *spatial]`` float one-hot maps of integer ``labels`` ``[B, *spatial]``."""
    return F.one_hot(labels.long(), num_classes).movedim(-1, 1).to(torch.float32)


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, *, include_background: bool = False,
                   smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice loss, 1 − mean Dice over classes, with batch-level sums.

    Sums run over the batch and the voxels (the "batch Dice" of nnU-Net), which keeps the
    loss defined when a sample does not contain a class.

    Args:
        logits: ``[B, C, *spatial]``.
        labels: ``[B, *spatial]`` integer classes.
        include_background: also average the Dice of class 0.
        smooth: added to numerator and denominator.

    Returns:
        Scalar loss in [0, 1].
    """
    probs = logits.float().softmax(dim=1)
    target = one_hot(labels, probs.shape[1])
    dims = [0] + list(range(2, probs.ndim))
    intersection = (probs * target).sum(dims)
    denominator = probs.sum(dims) + target.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    if not include_background and dice.numel() > 1:
        dice = dice[1:]
    return 1.0 - dice.mean()


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Voxel-averaged cross-entropy of ``logits`` against integer ``labels``."""
    return F.cross_entropy(logits.float(), labels.long())


def supervised_loss(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Supervised segmentation loss by name (``train.supervised_loss``).

    - ``dice_ce``: soft Dice + cross-entropy (nnU-Net's; the default);
    - ``dice``: soft Dice alone (Perone & Cohen-Adad 2018 train with it);
    - ``ce``: cross-entropy alone;
    - ``lovasz``: the Lovász-softmax loss over the classes present (Berman et al. 2018);
    - ``dice_ce+lovasz``: Dice + CE + Lovász-softmax, the combination of the left-atrium report's
      "MT + UN + Lovász" row (``shared/papers/la-mri-cps-uamt-lovasz.md``, Table 5).

    Raises:
        ValueError: unknown name.
    """
    if name == "dice":
        return soft_dice_loss(logits, labels)
    if name == "ce":
        return cross_entropy_loss(logits, labels)
    if name == "dice_ce":
        return soft_dice_loss(logits, labels) + cross_entropy_loss(logits, labels)
    if name == "lovasz":
        return lovasz_softmax(logits.float().softmax(dim=1), labels)
    if name == "dice_ce+lovasz":
        return (soft_dice_loss(logits, labels) + cross_entropy_loss(logits, labels)
                + lovasz_softmax(logits.float().softmax(dim=1), labels))
    raise ValueError(f"unknown supervised loss {name!r}; use one of {SUPERVISED_LOSSES}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-voxel ``values`` ``[B, *spatial]`` over ``mask``."""
    if mask is None:
        return values.mean()
    if mask.ndim == values.ndim + 1:
        mask = mask.squeeze(1)
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def consistency_loss(name: str, student_logits: torch.Tensor, target_probs: torch.Tensor,
                     mask: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Consistency between a student's prediction and a target distribution.

    Gradients flow into ``student_logits`` only; the target is detached here, so a
    caller cannot accidentally train its teacher through this loss.

    Args:
        name: ``mse`` (squared error of probabilities, summed over classes, as in the
            mean-teacher reference code), ``bce`` (per-class binary cross-entropy of the
            student's probabilities against the target's, Perone & Cohen-Adad 2018),
            ``kl`` (KL(target || student)) or ``symmetric_kl`` (KL both ways, Bortsova et
            al. 2019; here the target is detached, see
            :func:`symmetric_kl_divergence` for the two-sided form).
        student_logits: ``[B, C, *spatial]``.
        target_probs: ``[B, C, *spatial]`` probabilities.
        mask: optional valid-voxel mask.
        eps: clamp for logarithms.

    Returns:
        Scalar loss averaged over valid voxels.

    Raises:
        ValueError: unknown name.
    """
    target = target_probs.detach().float()
    student = student_logits.float()
    probs = student.softmax(dim=1)
    if name == "mse":
        per_voxel = ((probs - target) ** 2).sum(dim=1)
    elif name == "bce":
        p = probs.clamp(eps, 1 - eps)
        per_voxel = -(target * p.log() + (1 - target) * (1 - p).log()).sum(dim=1)
    elif name == "kl":
        per_voxel = (target * (target.clamp_min(eps).log() - student.log_softmax(dim=1))).sum(dim=1)
    elif name == "symmetric_kl":
        per_voxel = _symmetric_kl_per_voxel(probs, target, eps)
    else:
        raise ValueError(f"unknown consistency loss {name!r}; use one of {CONSISTENCY_LOSSES}")
    return _masked_mean(per_voxel, mask)


def _symmetric_kl_per_voxel(p: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    log_p = p.clamp_min(eps).log()
    log_q = q.clamp_min(eps).log()
    return ((p - q) * (log_p - log_q)).sum(dim=1)


def symmetric_kl_divergence(p: torch.Tensor, q: torch.Tensor, mask: torch.Tensor | None = None,
                            eps: float = 1e-6) -> torch.Tensor:
    """KL(p||q) + KL(q||p) = Σ (p − q)(log p − log q), averaged over voxels.

    Both arguments keep their gradients (Bortsova et al. train the one network through
    both branches).

    Args:
        p, q: probabilities ``[B, C, *spatial]``.
        mask: optional valid-voxel mask.
        eps: clamp for logarithms.
    """
    return _masked_mean(_symmetric_kl_per_voxel(p.float(), q.float(), eps), mask)
