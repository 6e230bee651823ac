"""Batch augmentation in torch, for 2D and 3D.

Spatial transforms are sampled once as affine matrices and can then be applied to
images (bilinear), label maps (nearest) and probability maps (bilinear) with exactly the
same parameters. That is what lets the mean teacher apply the student's spatial
augmentation to the teacher's *output* (Perone & Cohen-Adad, 2018), keeping both maps
aligned, and what transformation consistency needs to compare T(f(x)) with f(T(x)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSettings:
    """Ranges of the random augmentation.

    Attributes:
        rotation_deg: rotations uniform in ±rotation_deg (in-plane for 3D).
        scale: isotropic scale uniform in 1 ± scale.
        shift: translation uniform in ±shift of the half-width (grid units).
        noise_std: additive Gaussian noise σ (images are z-score normalised).
        intensity: multiplicative contrast and additive brightness uniform in ±intensity.
    """

    rotation_deg: float = 15.0
    scale: float = 0.1
    shift: float = 0.05
    noise_std: float = 0.1
    intensity: float = 0.1


def sample_affine(batch: int, dims: int, settings: AugmentSettings, generator: torch.Generator | None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Sample ``batch`` random affine matrices in normalised grid coordinates.

    Returns:
        ``[batch, dims, dims + 1]`` matrices for :func:`torch.nn.functional.affine_grid`.
    """
    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, generator=generator)

    angle = uniform(-1, 1) * math.radians(settings.rotation_deg)
    scale = 1.0 + uniform(-1, 1) * settings.scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(batch, dims, dims + 1)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    if dims == 3:
        theta[:, 2, 2] = 1.0 / scale
    for axis in range(dims):
        theta[:, axis, dims] = uniform(-1, 1) * settings.shift * 2
    return theta.to(device)


def identity_affine(batch: int, dims: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Identity matrices shaped like :func:`sample_affine`'s output."""
    theta = torch.zeros(batch, dims, dims + 1, device=device)
    for axis in range(dims):
        theta[:, axis, axis] = 1.0
    return theta


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Apply affine ``theta`` to ``x`` ``[B, C, *spatial]`` (zeros outside the field of view).

    Args:
        x: images or probability maps (float), or label maps as float with ``mode="nearest"``.
        theta: ``[B, dims, dims + 1]`` from :func:`sample_affine`.
        mode: ``bilinear`` or ``nearest``.
    """
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def warp_labels(labels: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Warp integer labels ``[B, *spatial]`` with nearest-neighbour sampling."""
    warped = warp(labels.unsqueeze(1).float(), theta, mode="nearest")
    return warped.squeeze(1).round().long()


def valid_mask(reference: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``[B, 1, *spatial]`` mask of output voxels that sample from inside the field of view."""
    ones = torch.ones((reference.shape[0], 1, *reference.shape[2:]), device=reference.device,
                      dtype=torch.float32)
    return (warp(ones, theta, mode="bilinear") > 0.999).to(reference.dtype)


def perturb_intensity(x: torch.Tensor, settings: AugmentSettings,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Random contrast/brightness per sample and additive Gaussian noise."""
    batch = x.shape[0]
    shape = (batch,) + (1,) * (x.ndim - 1)
    contrast = 1.0 + (torch.rand(shape, generator=generator) * 2 - 1) * settings.intensity
    brightness = (torch.rand(shape, generator=generator) * 2 - 1) * settings.intensity
    noise = torch.randn(x.shape, generator=generator) * settings.noise_std
    return x * contrast.to(x.device) + brightness.to(x.device) + noise.to(x.device)
