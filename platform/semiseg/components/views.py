"""Views of an image for multi-view co-training, and the fusion of the views' predictions.

Xia et al., "Uncertainty-aware multi-view co-training for semi-supervised medical image
segmentation and domain adaptation" (Medical Image Analysis 2020; WACV 2020 as "3D
semi-supervised learning with uncertainty-aware multi-view co-training"):

- A view is a rigid re-orientation of the spatial axes: a permutation of the axes
  followed by flips of some of them (:class:`View`). In 3D the views are the axis
  permutations, the first three cyclic so that each anatomical axis is the network's
  first axis once (the paper's axial, coronal and sagittal views); in 2D the image is
  transposed and rotated by quarter turns (:data:`VIEWS_2D`, :data:`VIEWS_3D`).
  :func:`to_view` and :func:`from_view` are exact inverses, so a prediction made in a
  view is mapped back voxel for voxel.
- Uncertainty-weighted label fusion: the target of view k is Σ_{j≠k} w_j p_j / Σ_{j≠k} w_j
  with w_j = 1 / (u_j + ε) per voxel, u_j the predictive entropy of view j's MC-dropout
  mean p_j (:func:`fuse_other_views`, :func:`mc_dropout_probs`).
- :class:`ViewEnsemble`: the evaluation model averaging the views' softmax.

Pure functions on tensors, so that each formula is tested on hand-built tensors.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from semiseg.components.uncertainty import dropout_active

FUSION_EPS = 1e-6
"""ε of the fusion weights 1 / (u + ε): keeps a view with zero entropy finite."""

PROBABILITY_FLOOR = 1e-12
"""Smallest probability :class:`ViewEnsemble` takes the logarithm of."""


@dataclass(frozen=True)
class View:
    """A re-orientation of the spatial axes: ``permutation`` then ``flips``.

    Attributes:
        name: what the view is (``identity``, ``transpose``, ``rot90``, ``hwd``...).
        permutation: spatial axis ``i`` of the view is spatial axis ``permutation[i]`` of
            the image.
        flips: spatial axes of the view (after the permutation) that are reversed.
    """

    name: str
    permutation: tuple[int, ...]
    flips: tuple[int, ...] = ()

    @property
    def inverse_permutation(self) -> tuple[int, ...]:
        """The permutation that puts the view's axes back in the image's order."""
        inverse = [0] * len(self.permutation)
        for view_axis, image_axis in enumerate(self.permutation):
            inverse[image_axis] = view_axis
        return tuple(inverse)


VIEWS_2D: tuple[View, ...] = (
    View("identity", (0, 1)),
    View("transpose", (1, 0)),
    View("rot90", (1, 0), (0,)),
    View("rot270", (1, 0), (1,)),
    View("rot180", (0, 1), (0, 1)),
    View("antitranspose", (1, 0), (0, 1)),
)
"""2D views over (H, W): identity, transpose, the quarter turns (``rot90`` equals
``torch.rot90(x, 1, (H, W))``), then the half turn and the anti-transpose."""

VIEWS_3D: tuple[View, ...] = (
    View("dhw", (0, 1, 2)),
    View("hwd", (1, 2, 0)),
    View("wdh", (2, 0, 1)),
    View("dwh", (0, 2, 1)),
    View("whd", (2, 1, 0)),
    View("hdw", (1, 0, 2)),
)
"""3D views over (D, H, W): the axis permutations; the first three are cyclic, so with
three views each axis is the network's first (slowest) axis in exactly one view."""

MAX_VIEWS = min(len(VIEWS_2D), len(VIEWS_3D))
"""The most views a method may ask for, in 2D and in 3D."""


def views_for(dims: int) -> tuple[View, ...]:
    """The view table of ``dims`` spatial dimensions.

    Raises:
        ValueError: ``dims`` not 2 or 3.
    """
    if dims == 2:
        return VIEWS_2D
    if dims == 3:
        return VIEWS_3D
    raise ValueError(f"views exist for 2 or 3 spatial dimensions, got {dims}")


def _view(view: int | View, dims: int) -> View:
    if isinstance(view, View):
        if len(view.permutation) != dims:
            raise ValueError(f"view {view.name} has {len(view.permutation)} axes, not {dims}")
        return view
    table = views_for(dims)
    if not 0 <= view < len(table):
        raise ValueError(f"view index {view} outside 0..{len(table) - 1} for {dims}D")
    return table[view]


def to_view(x: torch.Tensor, view: int | View, dims: int) -> torch.Tensor:
    """Re-orient the last ``dims`` axes of ``x`` into ``view``.

    Args:
        x: ``[..., *spatial]`` (images ``[B, C, *spatial]``, label maps ``[B, *spatial]``).
        view: index into :func:`views_for` ``(dims)`` or a :class:`View`.
        dims: number of trailing spatial axes (2 or 3).

    Returns:
        The re-oriented tensor (a view of ``x``'s storage when no axis is flipped); its
        spatial shape is ``x``'s permuted.
    """
    spec = _view(view, dims)
    lead = x.ndim - dims
    order = tuple(range(lead)) + tuple(lead + axis for axis in spec.permutation)
    out = x.permute(order)
    if spec.flips:
        out = out.flip([lead + axis for axis in spec.flips])
    return out


def from_view(x: torch.Tensor, view: int | View, dims: int) -> torch.Tensor:
    """The exact inverse of :func:`to_view`: map a tensor in ``view`` back to the image's orientation.

    Args:
        x: ``[..., *spatial_in_view]`` (e.g. a network's logits on a re-oriented image).
        view: the view ``x`` is in.
        dims: number of trailing spatial axes.

    Returns:
        ``x`` in the original orientation: ``from_view(to_view(y, v, d), v, d)`` equals ``y``.
    """
    spec = _view(view, dims)
    lead = x.ndim - dims
    if spec.flips:
        x = x.flip([lead + axis for axis in spec.flips])
    order = tuple(range(lead)) + tuple(lead + axis for axis in spec.inverse_permutation)
    return x.permute(order)


def entropy_weights(uncertainty: torch.Tensor, eps: float = FUSION_EPS) -> torch.Tensor:
    """Unnormalised fusion weights w = 1 / (max(u, 0) + ε) per voxel.

    Args:
        uncertainty: ``[B, 1, *spatial]`` predictive entropies (tiny negative values from
            the ε inside the entropy's logarithm count as 0).
        eps: ε.

    Returns:
        Weights shaped like ``uncertainty``.
    """
    return 1.0 / (uncertainty.float().clamp_min(0.0) + eps)


def fuse_other_views(probs: Sequence[torch.Tensor], uncertainties: Sequence[torch.Tensor], view: int,
                     eps: float = FUSION_EPS) -> torch.Tensor:
    """Uncertainty-weighted mean of the other views' probabilities: the co-training target of ``view``.

    Σ_{j≠k} w_j p_j / Σ_{j≠k} w_j with w_j = 1 / (u_j + ε) per voxel (:func:`entropy_weights`);
    view ``k``'s own prediction takes no part.

    Args:
        probs: ``K`` tensors ``[B, C, *spatial]``, each view's probabilities in the image's
            orientation.
        uncertainties: ``K`` tensors ``[B, 1, *spatial]``, each view's uncertainty u_j.
        view: k, the view the target is for.
        eps: ε of the weights.

    Returns:
        ``[B, C, *spatial]`` fused probabilities (detached, float32).

    Raises:
        ValueError: fewer than two views, mismatched lists, or ``view`` out of range.
    """
    if len(probs) != len(uncertainties) or len(probs) < 2:
        raise ValueError(f"fusion needs at least two views with one uncertainty each, got {len(probs)} "
                         f"probability maps and {len(uncertainties)} uncertainties")
    if not 0 <= view < len(probs):
        raise ValueError(f"view {view} outside 0..{len(probs) - 1}")
    weighted: torch.Tensor | None = None
    total: torch.Tensor | None = None
    for other, (p, u) in enumerate(zip(probs, uncertainties)):
        if other == view:
            continue
        weight = entropy_weights(u.detach(), eps)
        term = weight * p.detach().float()
        weighted = term if weighted is None else weighted + term
        total = weight if total is None else total + weight
    return weighted / total


@contextmanager
def mc_dropout_mode(network: nn.Module) -> Iterator[nn.Module]:
    """Evaluation mode with only the dropout layers active (Bayesian MC-dropout passes).

    BatchNorm uses its running statistics and does not update them; every module's mode
    is restored on exit.

    Yields:
        ``network``.
    """
    modes = {module: module.training for module in network.modules()}
    try:
        network.eval()
        with dropout_active(network):
            yield network
    finally:
        for module, training in modes.items():
            module.train(training)


@torch.no_grad()
def mc_dropout_probs(network: nn.Module, images: torch.Tensor, view: int | View, dims: int,
                     passes: int) -> torch.Tensor:
    """Mean softmax of ``passes`` MC-dropout passes of ``network`` on ``view`` of ``images``, mapped back.

    Args:
        network: the view's segmenter (unwrapped from DDP); only its dropout layers are stochastic.
        images: ``[B, C_in, *spatial]`` in the image's orientation.
        view: the view the network works in.
        dims: number of spatial dimensions.
        passes: T, at least 1 (dropout draws from the global torch RNG).

    Returns:
        ``[B, C, *spatial]`` float32 mean probabilities in the image's orientation, no gradient.

    Raises:
        ValueError: ``passes`` below 1.
    """
    if passes < 1:
        raise ValueError(f"MC dropout needs at least one pass, got {passes}")
    viewed = to_view(images, view, dims)
    total: torch.Tensor | None = None
    with mc_dropout_mode(network):
        for _ in range(passes):
            probs = network(viewed).float().softmax(dim=1)
            total = probs if total is None else total + probs
    return from_view(total / passes, view, dims)


class ViewEnsemble(nn.Module):
    """The views' networks as one evaluation model: the log of the mean of their softmax.

    Each network runs on its view of the input, its softmax is mapped back to the input's
    orientation, and the ``K`` maps are averaged. The output is log(mean p): its softmax is
    mean p exactly and its argmax that of mean p, so it drops in where a network's logits
    are expected (validation, sliding windows, prediction).

    Args:
        networks: the ``K`` segmenters (not DDP-wrapped), network ``k`` working in view ``k``.
        dims: number of spatial dimensions.
    """

    def __init__(self, networks: Sequence[nn.Module], dims: int) -> None:
        super().__init__()
        if len(networks) > len(views_for(dims)):
            raise ValueError(f"{len(networks)} networks but only {len(views_for(dims))} views in {dims}D")
        self.networks = nn.ModuleList(networks)
        self.dims = dims

    def mean_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, *spatial]`` mean of the views' softmax, in ``x``'s orientation (float32)."""
        total: torch.Tensor | None = None
        for view, network in enumerate(self.networks):
            probs = from_view(network(to_view(x, view, self.dims)).float().softmax(dim=1), view, self.dims)
            total = probs if total is None else total + probs
        return total / len(self.networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """log of :meth:`mean_probs` (floored at :data:`PROBABILITY_FLOOR`), contiguous."""
        return self.mean_probs(x).clamp_min(PROBABILITY_FLOOR).log().contiguous()
