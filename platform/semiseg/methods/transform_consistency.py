"""Consistency under transformations (Bortsova et al., MICCAI 2019).

"Semi-supervised medical image segmentation via learning consistency under
transformations"; defaults from the CIFAR-10 reproduction in
``shared/papers/bortsova-consistency-cifar10-reproduction.md``.

- One network f sees every image x (labelled and unlabelled) and a transformed copy
  T(x), in one batch [x, T(x)] (the paper's two weight-sharing branches).
- T is one of ``elastic`` (the paper's: elasticdeform's random elastic deformation,
  computed with ``grid_sample`` in :mod:`semiseg.components.elastic`, which agrees with
  the ``elasticdeform`` layer to float rounding and is 9–12× faster on CPU),
  ``shift`` (up to ±10 px per axis), ``rotation`` (uniform ±45°, in-plane for 3D),
  ``noise`` (additive N(0, 0.1), clipped to the batch's range) or ``affine`` (the
  configured augmentation ranges). The same T is applied to f(x)'s probabilities, so
  T(f(x)) and f(T(x)) are aligned; for ``noise`` T(f(x)) = f(x).
- Consistency: symmetric KL divergence KL(p‖q) + KL(q‖p) between T(f(x)) and f(T(x))
  (the paper's; the reproduction halves it, which the weight absorbs) or the squared
  error of the probabilities, on the voxels that T keeps inside the field of view,
  weighted by ``consistency`` times the configured ramp-up.
- Supervised loss on the labelled part of *both* views, the labels transformed with T
  (nearest neighbour).
- With ``base_augment`` the batch first gets the shared random affine and intensity
  augmentation (with its labels), as the supervised baseline does; T then acts on top.

Which network each loss trains: both losses train f, and the consistency trains it
through *both* branches (neither side is detached, as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch

from semiseg.augment import AugmentSettings, mixed_images, sample_affine, valid_mask, warp, warp_labels
from semiseg.components.elastic import (deformed_valid_mask, elastic_deform, elastic_deform_labels,
                                        sample_displacement)
from semiseg.config import NON_NEGATIVE, Bounds
from semiseg.losses import supervised_loss, symmetric_kl_divergence
from semiseg.methods.base import BuildContext, Method, MethodParams, Progress, StepOutput, hparam
from semiseg.methods.registry import register_method

TRANSFORMS = ("elastic", "shift", "rotation", "noise", "affine")
DIVERGENCES = ("symmetric_kl", "mse")


@dataclass(frozen=True)
class TransformConsistencyParams(MethodParams):
    """Hyperparameters of transformation consistency (defaults: the paper and its reproduction)."""

    transform: str = hparam("elastic", choices=TRANSFORMS,
                            help="transformation T (paper: elastic; reproduction: noise, shift, rotation)")
    divergence: str = hparam("symmetric_kl", choices=DIVERGENCES,
                             help="consistency between T(f(x)) and f(T(x)) (paper: symmetric KL)")
    consistency: float = hparam(1.0, low=0.01, high=10.0, log=True, bounds=NON_NEGATIVE,
                                help="weight λ of the consistency loss after ramp-up")
    elastic_sigma: float = hparam(4.0, low=1.0, high=10.0, bounds=NON_NEGATIVE,
                                  help="σ in voxels of the elastic control-point displacements")
    elastic_points: int = hparam(3, bounds=Bounds(2.0), help="elastic control points per axis")
    shift_px: float = hparam(10.0, bounds=NON_NEGATIVE, help="largest shift in voxels per axis (reproduction: 10)")
    rotation_deg: float = hparam(45.0, bounds=Bounds(0.0, 180.0),
                                 help="rotations uniform in ±rotation_deg (reproduction: 45)")
    noise_std: float = hparam(0.1, bounds=NON_NEGATIVE, help="σ of the additive noise transform (reproduction: 0.1)")
    base_augment: bool = hparam(True, choices=(False, True),
                                help="apply the shared affine and intensity augmentation before T")


@dataclass
class SampledTransform:
    """One random draw of T for a batch, applicable to images, probabilities and labels.

    Attributes:
        kind: one of :data:`TRANSFORMS`.
        theta: ``[B, dims, dims + 1]`` affine matrices (``shift``, ``rotation``, ``affine``).
        displacement: ``[B, dims, *points]`` elastic grids (``elastic``).
        noise: additive image noise (``noise``).
    """

    kind: str
    theta: torch.Tensor | None = None
    displacement: torch.Tensor | None = None
    noise: torch.Tensor | None = None

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """T(x) for input images ``[B, C, *spatial]``."""
        if self.noise is not None:
            return torch.clamp(x + self.noise, x.min(), x.max())
        return self.probs(x)

    def probs(self, p: torch.Tensor) -> torch.Tensor:
        """T(p) for probability maps, differentiable; identity for intensity transforms."""
        if self.displacement is not None:
            return elastic_deform(p, self.displacement)
        if self.theta is not None:
            return warp(p, self.theta)
        return p

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        """T(y) for integer label maps ``[B_l, *spatial]`` (nearest neighbour).

        The labelled samples are the first ``B_l`` of the batch T was drawn for, so they
        get the first ``B_l`` transforms.
        """
        count = y.shape[0]
        if self.displacement is not None:
            return elastic_deform_labels(y, self.displacement[:count])
        if self.theta is not None:
            return warp_labels(y, self.theta[:count])
        return y

    def mask(self, reference: torch.Tensor) -> torch.Tensor | None:
        """``[B, 1, *spatial]`` voxels of T's output sampled inside the field of view, or None."""
        if self.displacement is not None:
            return deformed_valid_mask(reference, self.displacement)
        if self.theta is not None:
            return valid_mask(reference, self.theta)
        return None


def shift_affine(batch: int, spatial: tuple[int, ...], max_shift_px: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Random translations of up to ±``max_shift_px`` voxels per axis, as affine matrices.

    Args:
        batch: number of samples.
        spatial: spatial shape (``H, W`` or ``D, H, W``).
        max_shift_px: largest shift in voxels.
        generator: torch generator.

    Returns:
        ``[batch, dims, dims + 1]`` matrices for :func:`semiseg.augment.warp`.
    """
    dims = len(spatial)
    theta = torch.zeros(batch, dims, dims + 1)
    for row, size in enumerate(reversed(spatial)):
        theta[:, row, row] = 1.0
        shift = (torch.rand(batch, generator=generator) * 2 - 1) * max_shift_px
        theta[:, row, dims] = shift * 2.0 / size
    return theta


def sample_transform(kind: str, images: torch.Tensor, params: TransformConsistencyParams, augment: AugmentSettings,
                     generator: torch.Generator | None) -> SampledTransform:
    """Draw T of type ``kind`` for the batch ``images`` ``[B, C, *spatial]``.

    Args:
        kind: one of :data:`TRANSFORMS`.
        images: the batch T will act on (shape and device).
        params: the method's hyperparameters (``shift_px``, ``rotation_deg``, ``noise_std``,
            ``elastic_sigma`` and ``elastic_points`` are read).
        augment: ranges for ``affine``.
        generator: torch generator.

    Returns:
        The sampled transform.

    Raises:
        ValueError: unknown ``kind``.
    """
    batch, dims, device = images.shape[0], images.ndim - 2, images.device
    if kind == "elastic":
        displacement = sample_displacement(batch, dims, params.elastic_sigma, params.elastic_points, generator)
        return SampledTransform(kind, displacement=displacement)
    if kind == "shift":
        theta = shift_affine(batch, tuple(images.shape[2:]), params.shift_px, generator)
        return SampledTransform(kind, theta=theta.to(device))
    if kind == "rotation":
        settings = replace(augment, rotation_deg=params.rotation_deg, scale=0.0, shift=0.0)
        return SampledTransform(kind, theta=sample_affine(batch, dims, settings, generator, device,
                                                          shape=images.shape[2:]))
    if kind == "affine":
        return SampledTransform(kind, theta=sample_affine(batch, dims, augment, generator, device,
                                                          shape=images.shape[2:]))
    if kind == "noise":
        noise = torch.randn(images.shape, generator=generator) * params.noise_std
        return SampledTransform(kind, noise=noise.to(device, images.dtype))
    raise ValueError(f"unknown transform {kind!r}; use one of {TRANSFORMS}")


def probability_divergence(name: str, p: torch.Tensor, q: torch.Tensor,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Divergence between two probability maps, both keeping their gradients.

    Args:
        name: ``symmetric_kl`` (KL(p‖q) + KL(q‖p)) or ``mse`` (squared error summed over
            classes).
        p, q: ``[B, C, *spatial]`` probabilities.
        mask: optional ``[B, 1, *spatial]`` valid voxels.

    Returns:
        Scalar averaged over the (valid) voxels.

    Raises:
        ValueError: unknown name.
    """
    if name == "symmetric_kl":
        return symmetric_kl_divergence(p, q, mask)
    if name == "mse":
        per_voxel = ((p.float() - q.float()) ** 2).sum(dim=1)
        if mask is None:
            return per_voxel.mean()
        weights = mask.squeeze(1).to(per_voxel.dtype)
        return (per_voxel * weights).sum() / weights.sum().clamp_min(1.0)
    raise ValueError(f"unknown divergence {name!r}; use one of {DIVERGENCES}")


@register_method
class TransformConsistency(Method):
    """One network trained on labels and on consistency of its output under a transformation."""

    name = "transform_consistency"
    Params = TransformConsistencyParams
    params: TransformConsistencyParams

    def __init__(self, context: BuildContext, params: TransformConsistencyParams) -> None:
        super().__init__(context, params)
        self.trained["student"] = context.build_network()

    def training_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """Supervised loss on both views of the labelled part, consistency on all images."""
        images, labels, n_l = self._augmented(batch)
        transform = sample_transform(self.params.transform, images, self.params,
                                     self.context.augment, self.generator)
        logits = self.trained["student"](torch.cat([images, transform.images(images)]))
        logits_x, logits_tx = logits.split(images.shape[0])
        loss_sup = supervised_loss(self.context.supervised_loss,
                                   torch.cat([logits_x[:n_l], logits_tx[:n_l]]),
                                   torch.cat([labels, transform.labels(labels)]))
        t_of_f = transform.probs(logits_x.float().softmax(dim=1))
        f_of_t = logits_tx.float().softmax(dim=1)
        loss_cons = probability_divergence(self.params.divergence, t_of_f, f_of_t,
                                           transform.mask(f_of_t))
        weight = self.cons_weight(progress, self.params.consistency)
        return StepOutput(objectives={"main": loss_sup + weight * loss_cons},
                          logs={"loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach(),
                                "cons_weight": weight},
                          unsupervised=loss_cons)

    def _augmented(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Labelled + unlabelled images (optionally augmented), the labelled part's labels, its size."""
        if not self.params.base_augment:
            return mixed_images(batch), batch["label_l"], batch["image_l"].shape[0]
        augmented = self.augment_batch(batch)
        return augmented.images, augmented.labels, augmented.n_l

