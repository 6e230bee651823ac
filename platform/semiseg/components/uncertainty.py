"""Monte Carlo uncertainty of a teacher and uncertainty-masked consistency (UA-MT).

Yu et al., "Uncertainty-aware self-ensembling model for semi-supervised 3D left atrium
segmentation" (MICCAI 2019):

- T stochastic teacher passes with dropout active and input noise
  clamp(N(0, 0.1), ±0.2); μ_c = (1/T) Σ_t p_t^c (:func:`mc_teacher_probs`);
- predictive entropy u = −Σ_c μ_c log μ_c (:func:`predictive_entropy`), at most ln C;
- threshold H = (0.75 + 0.25·w(t))·ln C with w the sigmoid ramp-up
  (:func:`uncertainty_threshold`; the reference code hard-codes ln 2);
- consistency Σ_v 𝟙(u_v < H)‖f'_v − f_v‖² / (C·Σ_v 𝟙(u_v < H))
  (:func:`masked_consistency`; the reference code divides by 2·Σ mask, i.e. C = 2).

Pure functions, so that each formula can be tested on hand-built tensors.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@contextmanager
def dropout_active(model: nn.Module) -> Iterator[nn.Module]:
    """Put only the dropout layers of ``model`` in training mode, restoring every mode on exit.

    BatchNorm and every other layer keep their current mode (eval for a teacher), so
    the stochastic passes vary through dropout alone and do not touch running statistics.

    Args:
        model: the network (typically a frozen EMA teacher in eval mode).

    Yields:
        ``model`` with its dropout layers active.
    """
    modes = {module: module.training for module in model.modules()}
    try:
        for module in model.modules():
            if isinstance(module, _DROPOUT):
                module.train()
        yield model
    finally:
        for module, training in modes.items():
            module.train(training)


def clamped_noise(shape: torch.Size | tuple[int, ...], std: float, clip: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """clamp(N(0, std²), −clip, clip) noise of ``shape`` (CPU, float32).

    Args:
        shape: noise shape.
        std: standard deviation.
        clip: absolute bound.
        generator: torch generator.

    Returns:
        The noise tensor.
    """
    return (torch.randn(shape, generator=generator) * std).clamp(-clip, clip)


@torch.no_grad()
def mc_teacher_probs(teacher: nn.Module, images: torch.Tensor, passes: int, noise_std: float = 0.1,
                     noise_clip: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean softmax of ``passes`` stochastic teacher passes (MC dropout + input noise).

    Args:
        teacher: the network; only its dropout layers are switched to training mode.
        images: ``[B, C_in, *spatial]`` inputs.
        passes: number of stochastic passes T (at least 1).
        noise_std: σ of the input noise.
        noise_clip: bound of the input noise.
        generator: torch generator for the noise.

    Returns:
        ``[B, C, *spatial]`` float32 mean probabilities μ (no gradient).

    Raises:
        ValueError: ``passes`` below 1.
    """
    if passes < 1:
        raise ValueError(f"UA-MT needs at least one teacher pass, got {passes}")
    total: torch.Tensor | None = None
    with dropout_active(teacher):
        for _ in range(passes):
            noise = clamped_noise(images.shape, noise_std, noise_clip, generator).to(images.device, images.dtype)
            probs = teacher(images + noise).float().softmax(dim=1)
            total = probs if total is None else total + probs
    return total / passes


def predictive_entropy(probs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Entropy u = −Σ_c μ_c log(μ_c + eps) per voxel.

    Args:
        probs: ``[B, C, *spatial]`` (mean) probabilities.
        eps: added inside the logarithm (reference code: 1e-6).

    Returns:
        ``[B, 1, *spatial]`` entropies in nats (≈ ln C for a uniform distribution).
    """
    probs = probs.float()
    return -(probs * torch.log(probs + eps)).sum(dim=1, keepdim=True)


def uncertainty_threshold(ramp: float, num_classes: int) -> float:
    """UA-MT's entropy threshold H = (0.75 + 0.25·ramp)·ln C.

    Args:
        ramp: ramp-up value w(t) in [0, 1] (sigmoid ramp-up over the schedule).
        num_classes: C.

    Returns:
        The threshold in nats; from 0.75·ln C (few voxels kept) to ln C (nearly all).

    Raises:
        ValueError: ``num_classes`` below 2 or ``ramp`` outside [0, 1].
    """
    if num_classes < 2:
        raise ValueError(f"entropy thresholds need at least 2 classes, got {num_classes}")
    if not 0.0 <= ramp <= 1.0:
        raise ValueError(f"ramp must be in [0, 1], got {ramp}")
    return (0.75 + 0.25 * ramp) * math.log(num_classes)


def certainty_mask(uncertainty: torch.Tensor, threshold: float) -> torch.Tensor:
    """``𝟙(u < H)`` as float, shaped like ``uncertainty``.

    Args:
        uncertainty: ``[B, 1, *spatial]`` entropies.
        threshold: H.

    Returns:
        Mask of ones (certain voxels) and zeros.
    """
    return (uncertainty < threshold).float()


def masked_consistency(student_probs: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor,
                       eps: float = 1e-16) -> torch.Tensor:
    """Σ_v mask_v Σ_c (s_vc − t_vc)² / (C·Σ_v mask_v + eps).

    Gradients flow into ``student_probs`` only; the teacher's probabilities are detached.

    Args:
        student_probs: ``[B, C, *spatial]``.
        teacher_probs: ``[B, C, *spatial]``.
        mask: ``[B, 1, *spatial]`` certainty mask.
        eps: keeps the ratio defined (0) when no voxel is certain.

    Returns:
        Scalar: the mean squared probability difference over the certain voxels and the
        classes.
    """
    num_classes = student_probs.shape[1]
    squared = (student_probs.float() - teacher_probs.detach().float()) ** 2
    mask = mask.float()
    return (squared * mask).sum() / (num_classes * mask.sum() + eps)
