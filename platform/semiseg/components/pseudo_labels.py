"""Hard pseudo-labels and the losses that train a network on them.

Cross pseudo supervision (Chen et al., CVPR 2021) trains each of two networks on the
other's one-hot (argmax) predictions. The pseudo-labels are integer maps computed
without gradient, so a network's pseudo-label term trains that network only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semiseg.components.lovasz import lovasz_softmax

PSEUDO_LOSSES = ("ce", "lovasz")


@torch.no_grad()
def hard_pseudo_labels(logits: torch.Tensor) -> torch.Tensor:
    """Argmax class per voxel, detached.

    Args:
        logits: ``[B, C, *spatial]`` logits or probabilities.

    Returns:
        ``[B, *spatial]`` int64 pseudo-labels.
    """
    return logits.detach().argmax(dim=1)


def pseudo_label_loss(logits: torch.Tensor, pseudo_labels: torch.Tensor, name: str = "ce") -> torch.Tensor:
    """Loss of ``logits`` against hard pseudo-labels.

    Args:
        logits: ``[B, C, *spatial]`` logits of the network being trained.
        pseudo_labels: ``[B, *spatial]`` integer targets (no gradient).
        name: ``ce`` (voxel-averaged cross-entropy) or ``lovasz`` (cross-entropy plus the
            Lovász-softmax loss of the softmax, Berman et al. 2018).

    Returns:
        Scalar loss.

    Raises:
        ValueError: unknown ``name``.
    """
    if name not in PSEUDO_LOSSES:
        raise ValueError(f"unknown pseudo-label loss {name!r}; use one of {PSEUDO_LOSSES}")
    logits = logits.float()
    loss = F.cross_entropy(logits, pseudo_labels.long())
    if name == "lovasz":
        loss = loss + lovasz_softmax(logits.softmax(dim=1), pseudo_labels)
    return loss


def cross_pseudo_supervision_loss(logits_a: torch.Tensor, logits_b: torch.Tensor,
                                  name: str = "ce") -> torch.Tensor:
    """ℓ(a, argmax b) + ℓ(b, argmax a): each network supervised by the other's pseudo-labels.

    Args:
        logits_a: ``[B, C, *spatial]`` logits of the first network.
        logits_b: ``[B, C, *spatial]`` logits of the second network, same images.
        name: per-term loss, see :func:`pseudo_label_loss`.

    Returns:
        Scalar sum of the two terms; the gradient of the first term reaches only
        ``logits_a`` and that of the second only ``logits_b``.
    """
    return (pseudo_label_loss(logits_a, hard_pseudo_labels(logits_b), name)
            + pseudo_label_loss(logits_b, hard_pseudo_labels(logits_a), name))
