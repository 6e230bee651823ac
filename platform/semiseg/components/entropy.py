"""Entropy and self-information of softmax predictions (Grandvalet & Bengio 2005; ADVENT).

For class probabilities ``p = softmax(logits)`` over ``C`` classes:

- the self-information map (ADVENT's "weighted self-information", ``prob_2_entropy``) is
  ``I_c = −p_c log p_c / log C``, one channel per class (:func:`self_information`);
- the pixel-wise entropy is ``H = Σ_c I_c = −Σ_c p_c log p_c / log C`` (:func:`pixel_entropy`),
  in ``[0, 1]`` (1 for the uniform distribution);
- the entropy loss is its mean over the batch and the pixels (:func:`mean_entropy`,
  ADVENT's ``entropy_loss``).

Division by ``log C`` is ADVENT's normalisation (its reference code uses ``log2`` over
``log2 C``, the same ratio); ``normalise=False`` gives the entropy in nats of Grandvalet &
Bengio. Everything is computed from logits with ``log_softmax``, so gradients stay finite
even where a probability underflows to 0.
"""

from __future__ import annotations

import math

import torch


def self_information(logits: torch.Tensor, *, normalise: bool = True) -> torch.Tensor:
    """Per-class self-information ``−p log p`` of ``softmax(logits)`` along axis 1.

    Args:
        logits: ``[B, C, *spatial]``.
        normalise: divide by ``log C`` (ADVENT).

    Returns:
        ``[B, C, *spatial]`` float32 map, non-negative.

    Raises:
        ValueError: fewer than 2 classes when normalising.
    """
    log_probs = logits.float().log_softmax(dim=1)
    information = -log_probs.exp() * log_probs
    return information / _normaliser(logits.shape[1]) if normalise else information


def pixel_entropy(logits: torch.Tensor, *, normalise: bool = True) -> torch.Tensor:
    """Entropy ``−Σ_c p_c log p_c`` of ``softmax(logits)`` at every pixel.

    Args:
        logits: ``[B, C, *spatial]``.
        normalise: divide by ``log C`` (ADVENT), so the entropy lies in ``[0, 1]``.

    Returns:
        ``[B, *spatial]`` float32 map.
    """
    return self_information(logits, normalise=normalise).sum(dim=1)


def mean_entropy(logits: torch.Tensor, *, normalise: bool = True) -> torch.Tensor:
    """Mean pixel-wise entropy over the batch and the pixels: the entropy-minimisation loss.

    Args:
        logits: ``[B, C, *spatial]``.
        normalise: divide by ``log C`` (ADVENT).

    Returns:
        Scalar float32 tensor.
    """
    return pixel_entropy(logits, normalise=normalise).mean()


def _normaliser(num_classes: int) -> float:
    if num_classes < 2:
        raise ValueError(f"a normalised entropy needs at least 2 classes, got {num_classes}")
    return math.log(num_classes)
