"""Elastic deformation with ``torch.nn.functional.grid_sample``, matching ``elasticdeform``.

The paper's code (and :mod:`semiseg.components.elasticdeform_reference`) deforms each sample with
``elasticdeform.torch.deform_grid``: the tensors go to NumPy, a single-threaded C loop
interpolates the coarse displacement grid and the image voxel by voxel, and the result
comes back; on a GPU that is two device-host copies per sample. This module computes the
same deformation with torch operations on the whole batch at once:

1. the coarse control-point displacements ``[B, dims, P, ...]`` are upsampled to a dense
   field ``[B, dims, *spatial]`` by the interpolating cubic B-spline that
   ``elasticdeform`` uses (its control points span the image corner to corner,
   ``cp = (P - 1) · j / (N - 1)``, and the B-spline coefficients are prefiltered with
   mirror boundaries, as ``scipy.ndimage.spline_filter1d(mode="mirror")``). The spline is
   linear in the displacements, so it is one small ``[N, P]`` matrix per axis, applied
   separably with ``einsum``;
2. every output voxel ``j`` samples the input at ``j + displacement(j)`` with
   ``grid_sample`` (``align_corners=True``: grid coordinates are voxel centres);
3. voxels whose sampling point falls outside ``[0, N - 1]`` on any axis are zero, as with
   ``elasticdeform``'s ``mode="constant", cval=0`` (``grid_sample``'s zero padding alone
   would blend the border voxels with zeros instead).

Linear interpolation (``order=1``) is exact up to float32 rounding; nearest (``order=0``)
differs only where a sampling point lies exactly half-way between voxels
(``elasticdeform`` rounds half up, ``grid_sample`` half to even). Gradients flow to the
input through ``grid_sample``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def _cubic_bspline(t: float) -> float:
    """The centred cubic B-spline kernel β³(t)."""
    t = abs(t)
    if t < 1.0:
        return (4.0 - 6.0 * t * t + 3.0 * t ** 3) / 6.0
    if t < 2.0:
        return (2.0 - t) ** 3 / 6.0
    return 0.0


def _mirror(index: int, length: int) -> int:
    """Fold an index into ``[0, length)`` by whole-sample mirroring (elasticdeform's border rule)."""
    if length <= 1:
        return 0
    period = 2 * length - 2
    index %= period
    return period - index if index >= length else index


@functools.lru_cache(maxsize=64)
def spline_matrix(size: int, points: int) -> torch.Tensor:
    """The ``[size, points]`` float64 matrix mapping control-point values to voxel values.

    Row ``j`` holds the weights of the interpolating cubic B-spline through ``points``
    control values, evaluated at ``cp = (points - 1) · j / (size - 1)``.

    Args:
        size: voxels along the axis (at least 2).
        points: control points along the axis (at least 2).

    Returns:
        The interpolation matrix (each row sums to one).

    Raises:
        ValueError: fewer than 2 voxels or control points.
    """
    if size < 2 or points < 2:
        raise ValueError(f"need at least 2 voxels and 2 control points, got {size} and {points}")
    prefilter = torch.zeros(points, points, dtype=torch.float64)
    for i in range(points):
        for offset in (-1, 0, 1):
            prefilter[i, _mirror(i + offset, points)] += _cubic_bspline(offset)
    evaluate = torch.zeros(size, points, dtype=torch.float64)
    for j in range(size):
        position = (points - 1) * j / (size - 1)
        start = math.floor(position) - 1
        for index in range(start, start + 4):
            evaluate[j, _mirror(index, points)] += _cubic_bspline(position - index)
    return evaluate @ torch.linalg.inv(prefilter)


def dense_displacement(displacement: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Upsample control-point displacements ``[B, dims, *points]`` to ``[B, dims, *shape]`` (voxels).

    Raises:
        ValueError: ``dims`` is not 2 or 3 or does not match ``shape``.
    """
    dims = displacement.shape[1]
    if dims not in (2, 3) or len(shape) != dims or displacement.ndim != dims + 2:
        raise ValueError(f"displacement {tuple(displacement.shape)} does not fit a {len(shape)}D shape {shape}")
    matrices = [spline_matrix(size, points).to(displacement.device, displacement.dtype)
                for size, points in zip(shape, displacement.shape[2:])]
    if dims == 2:
        return torch.einsum("ip,jq,bapq->baij", *matrices, displacement)
    return torch.einsum("ip,jq,kr,bapqr->baijk", *matrices, displacement)


def sampling_coordinates(displacement: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``[B, dims, *shape]`` voxel coordinates ``j + displacement(j)`` that each output voxel reads."""
    dense = dense_displacement(displacement, shape)
    axes = [torch.arange(size, device=dense.device, dtype=dense.dtype) for size in shape]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return dense + identity


def _grid(coordinates: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``grid_sample`` grid ``[B, *shape, dims]`` (last axis first, ``align_corners=True`` units)."""
    scales = torch.tensor([2.0 / (size - 1) for size in shape], device=coordinates.device, dtype=coordinates.dtype)
    view = (1, len(shape)) + (1,) * len(shape)
    normalised = coordinates * scales.view(view) - 1.0
    return normalised.flip(1).movedim(1, -1)


def _inside(coordinates: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``[B, 1, *shape]`` mask of sampling points inside ``[0, N - 1]`` on every axis."""
    upper = torch.tensor([size - 1 for size in shape], device=coordinates.device, dtype=coordinates.dtype)
    view = (1, len(shape)) + (1,) * len(shape)
    inside = (coordinates >= 0) & (coordinates <= upper.view(view))
    return inside.all(dim=1, keepdim=True)


def elastic_deform(x: torch.Tensor, displacement: torch.Tensor, order: int = 1) -> torch.Tensor:
    """Deform ``x`` ``[B, C, *spatial]`` like :func:`semiseg.components.elasticdeform_reference.elastic_deform`.

    Args:
        x: float images or probability maps, 2 or 3 spatial axes.
        displacement: ``[B, dims, *points]`` control-point displacements in voxels.
        order: 1 (linear) or 0 (nearest).

    Returns:
        The deformed batch (same shape, dtype and device), zero where the sampling point
        leaves the field of view.

    Raises:
        ValueError: a displacement that does not match ``x``, or an order other than 0 or 1.
    """
    shape = tuple(x.shape[2:])
    if displacement.shape[0] != x.shape[0] or displacement.shape[1] != len(shape):
        raise ValueError(f"displacement {tuple(displacement.shape)} does not match a batch {tuple(x.shape)}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 or 1, got {order}")
    coordinates = sampling_coordinates(displacement.to(x.device, torch.float32), shape)
    grid = _grid(coordinates, shape)
    mode = "bilinear" if order == 1 else "nearest"
    sampled = F.grid_sample(x.float(), grid, mode=mode, padding_mode="zeros", align_corners=True)
    return (sampled * _inside(coordinates, shape)).to(x.dtype)


def elastic_deform_labels(labels: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Deform integer label maps ``[B, *spatial]`` with nearest-neighbour sampling (outside: class 0)."""
    with torch.no_grad():
        deformed = elastic_deform(labels.unsqueeze(1).float(), displacement, order=0)
    return deformed.squeeze(1).round().long()


def deformed_valid_mask(reference: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``[B, 1, *spatial]`` mask of voxels sampled from inside the image, in ``reference``'s dtype."""
    shape = tuple(reference.shape[2:])
    with torch.no_grad():
        coordinates = sampling_coordinates(displacement.to(reference.device, torch.float32), shape)
        return _inside(coordinates, shape).to(reference.dtype)


def sample_displacement(batch: int, dims: int, sigma: float, points: int,
                        generator: torch.Generator | None) -> torch.Tensor:
    """Sample one random control-point displacement grid per sample.

    Args:
        batch: number of samples.
        dims: 2 or 3 spatial dimensions.
        sigma: standard deviation of the displacements, in voxels.
        points: control points per spatial axis (at least 2).
        generator: torch generator for reproducible sampling (CPU).

    Returns:
        ``[batch, dims, points, ..., points]`` float32 displacements (CPU).

    Raises:
        ValueError: ``dims`` not 2 or 3, ``points`` below 2 or negative ``sigma``.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if points < 2:
        raise ValueError(f"an elastic grid needs at least 2 control points per axis, got {points}")
    if sigma < 0:
        raise ValueError(f"elastic sigma must be >= 0, got {sigma}")
    shape = (batch, dims) + (points,) * dims
    return torch.randn(shape, generator=generator) * sigma


def elastic_deform_pair(images: torch.Tensor, probs: torch.Tensor, sigma: float, points: int,
                        generator: torch.Generator | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one deformation per sample and apply it to an image batch and a probability batch.

    The same displacement grid deforms ``images[b]`` and ``probs[b]``, so T(x) and
    T(f(x)) are aligned; gradients flow through both.

    Args:
        images: ``[B, C_in, *spatial]`` images.
        probs: ``[B, C, *spatial]`` probability maps with the same spatial shape.
        sigma: displacement standard deviation in voxels.
        points: control points per axis.
        generator: torch generator for the displacements.

    Returns:
        ``(deformed images, deformed probabilities, displacement)``.

    Raises:
        ValueError: images and probabilities differ in batch or spatial shape.
    """
    if images.shape[0] != probs.shape[0] or images.shape[2:] != probs.shape[2:]:
        raise ValueError(f"images {tuple(images.shape)} and probabilities {tuple(probs.shape)} "
                         "must share batch and spatial shape")
    displacement = sample_displacement(images.shape[0], images.ndim - 2, sigma, points, generator)
    return elastic_deform(images, displacement), elastic_deform(probs, displacement), displacement
