"""Batch augmentation in torch, for 2D and 3D.

Spatial transforms are sampled once as affine matrices and can then be applied to
images (bilinear), label maps (nearest) and probability maps (bilinear) with exactly the
same parameters. That is what lets the mean teacher apply the student's spatial
augmentation to the teacher's *output* (Perone & Cohen-Adad, 2018), keeping both maps
aligned, and what transformation consistency needs to compare T(f(x)) with f(T(x)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSettings:
    """Ranges of the random augmentation.

    Rotations are in the axial X–Y plane (tensor axes 2 and 3, the first two spatial
    axes), in millimetres: with ``spacing`` and the grid shape, a disc stays a disc on an
    anisotropic or non-square grid. Z (3D) gets only the scale and the shift.

    Attributes:
        rotation_deg: rotations uniform in ±rotation_deg, in the axial X–Y plane, in millimetres.
        scale: isotropic scale (in mm) uniform in 1 ± scale.
        shift: translation per axis uniform in ±2·shift of that axis' half-width
            (normalised grid units, i.e. ±shift of the axis' width).
        noise_std: additive Gaussian noise σ (images are z-score normalised).
        intensity: multiplicative contrast and additive brightness uniform in ±intensity.
        spacing: voxel size in mm along X, Y, Z of the grids that are warped (2D uses the
            first two); the training loop passes the training data's median spacing.
    """

    rotation_deg: float = 15.0
    scale: float = 0.1
    shift: float = 0.05
    noise_std: float = 0.1
    intensity: float = 0.1
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)


def affine_from_parameters(angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                           shape: Sequence[int], spacing: Sequence[float]) -> torch.Tensor:
    """Affine matrices for :func:`warp` from explicit parameters.

    The rotation (in the X–Y plane of tensor axes 2 and 3) and the isotropic scale are
    built in millimetres, each axis' half-extent being ``size * spacing / 2``, then
    converted to :func:`torch.nn.functional.affine_grid`'s normalised coordinates, whose
    order is reversed (its first row acts on the last tensor axis). Like ``affine_grid``
    the matrix maps output positions to the input positions they sample.

    Args:
        angle: ``[B]`` rotation angles in radians.
        scale: ``[B]`` isotropic scale factors (> 1 enlarges the content).
        shift: ``[B, dims]`` translations in normalised units (fractions of each axis'
            half-width), in tensor-axis order (X, Y[, Z]).
        shape: the spatial shape ``(X, Y[, Z])`` of the tensors to warp.
        spacing: voxel size in mm along X, Y, Z (only the first ``dims`` entries are used).

    Returns:
        ``[B, dims, dims + 1]`` float32 matrices for :func:`torch.nn.functional.affine_grid`.

    Raises:
        ValueError: ``shape`` is not 2D or 3D, or ``spacing`` has fewer entries than it.
    """
    dims = len(shape)
    if dims not in (2, 3) or len(spacing) < dims:
        raise ValueError(f"need a 2D or 3D shape and a spacing per axis, got shape {tuple(shape)} "
                         f"and spacing {tuple(spacing)}")
    batch = angle.shape[0]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # Output-to-input map in mm, tensor-axis order (X, Y[, Z]); the sign of the angle is
    # such that a 2D square isotropic grid gets the same matrix as the former normalised one.
    physical = torch.zeros(batch, dims, dims)
    physical[:, 0, 0], physical[:, 0, 1] = cos, sin
    physical[:, 1, 0], physical[:, 1, 1] = -sin, cos
    if dims == 3:
        physical[:, 2, 2] = 1.0 / scale
    half = torch.tensor([float(n) * float(s) / 2.0 for n, s in zip(shape, spacing)])
    # Normalised coordinates n_i = p_i / half_i: entry (i, j) scales by half_j / half_i.
    normalised = physical * half[None, None, :] / half[None, :, None]
    theta = torch.zeros(batch, dims, dims + 1)
    order = list(reversed(range(dims)))  # affine_grid's (x, y, z) = (last axis, ..., first axis)
    theta[:, :, :dims] = normalised[:, order][:, :, order]
    theta[:, :, dims] = shift.float()[:, order]
    return theta


def sample_affine(batch: int, dims: int, settings: AugmentSettings, generator: torch.Generator | None,
                  device: torch.device | str = "cpu", *, shape: Sequence[int]) -> torch.Tensor:
    """Sample ``batch`` random affine matrices in normalised grid coordinates.

    Rotation in the axial X–Y plane and isotropic scale are in millimetres (see
    :func:`affine_from_parameters`), using ``settings.spacing`` and ``shape``.

    Args:
        batch: number of matrices.
        dims: 2 or 3.
        settings: the ranges and the voxel spacing.
        generator: torch generator (draws: angle, scale, then one shift per axis).
        device: where the matrices go.
        shape: spatial shape of the tensors they will warp (``images.shape[2:]``).

    Returns:
        ``[batch, dims, dims + 1]`` matrices for :func:`torch.nn.functional.affine_grid`.

    Raises:
        ValueError: ``shape`` does not have ``dims`` axes.
    """
    if len(shape) != dims:
        raise ValueError(f"shape {tuple(shape)} does not have {dims} spatial axes")

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(batch, generator=generator)

    angle = uniform(-1, 1) * math.radians(settings.rotation_deg)
    scale = 1.0 + uniform(-1, 1) * settings.scale
    # Shifts drawn in affine_grid's row order (last tensor axis first), as before.
    shift_rows = torch.stack([uniform(-1, 1) * settings.shift * 2 for _ in range(dims)], dim=1)
    shift = shift_rows.flip(1)
    return affine_from_parameters(angle, scale, shift, shape, settings.spacing).to(device)


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


@dataclass(frozen=True)
class AugmentedBatch:
    """A training batch after the augmentation its images share.

    Attributes:
        original: the images before augmentation, labelled first (``[N_l + N_u, C, *spatial]``).
        images: ``original`` warped by ``theta``, then with random intensity (what a student sees).
        labels: the labelled part's labels warped by ``theta[:n_l]`` (nearest neighbour).
        theta: the affine matrices, one per image (also for warping a teacher's output).
        n_l: how many of the images are labelled.
    """

    original: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    theta: torch.Tensor
    n_l: int


def augment_images(images: torch.Tensor, dims: int, settings: AugmentSettings,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One random affine + intensity view of ``images`` and its affine matrices.

    Draws from ``generator`` in this order: :func:`sample_affine`, then
    :func:`perturb_intensity`.

    Returns:
        ``(augmented, theta)``.
    """
    theta = sample_affine(images.shape[0], dims, settings, generator, images.device, shape=images.shape[2:])
    return perturb_intensity(warp(images, theta), settings, generator), theta


def mixed_images(batch: Mapping[str, torch.Tensor], unlabelled: bool = True) -> torch.Tensor:
    """``image_l`` followed by ``image_u`` (when the batch has it and ``unlabelled``)."""
    if unlabelled and "image_u" in batch:
        return torch.cat([batch["image_l"], batch["image_u"]])
    return batch["image_l"]


def augment_batch(batch: Mapping[str, torch.Tensor], dims: int, settings: AugmentSettings,
                  generator: torch.Generator | None, *, unlabelled: bool = True) -> AugmentedBatch:
    """The shared augmentation of a mixed batch: one affine and intensity draw per image.

    Args:
        batch: ``image_l``, ``label_l`` and optionally ``image_u``.
        dims: 2 or 3.
        settings: the augmentation ranges.
        generator: the method's generator (draws as :func:`augment_images`).
        unlabelled: include ``image_u``; ``False`` augments the labelled images only.
    """
    original = mixed_images(batch, unlabelled)
    images, theta = augment_images(original, dims, settings, generator)
    n_l = batch["image_l"].shape[0]
    return AugmentedBatch(original=original, images=images, labels=warp_labels(batch["label_l"], theta[:n_l]),
                          theta=theta, n_l=n_l)
