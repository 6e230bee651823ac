"""Elastic deformation through ``elasticdeform`` (the reference implementation).

The library uses :mod:`semiseg.components.elastic` (``grid_sample``, 9–12× faster on CPU and
free of host copies on a GPU); this module keeps the implementation of the paper's code so
that tests and benchmarks show the two agree (to float rounding).

Random elastic deformations as a differentiable layer, for 2D and 3D batches.

Bortsova et al. (MICCAI 2019) compare T(f(x)) with f(T(x)) for elastic T, so the same
deformation must be applied to an input image (before the network) and to a
probability map (after it), with gradients flowing through the latter. This module
does that with ``elasticdeform.torch.deform_grid`` (van Tulder's ``elasticdeform``,
the library of the paper's code): a coarse grid of random displacements (σ in voxels,
``points`` control points per axis) is interpolated to every voxel, and the same grid
deforms images, probability maps and label maps.

Each sample of a batch gets its own displacement grid. Interpolation is linear
(``order=1``) for images and probabilities, so a deformed probability map still sums
to one inside the field of view, and nearest (``order=0``) for labels. Voxels that
sample from outside the field of view are zero; :func:`deformed_valid_mask` marks the
others so that a consistency loss can skip them.

``elasticdeform`` is an optional dependency (the ``reference`` extra, installed by
``scripts/setup.sh --test``): the library never imports this module, and this module imports
``elasticdeform`` only when a deformation is computed, so that importing it without the extra
succeeds and :func:`elastic_deform` raises one clear :class:`ModuleNotFoundError`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from semiseg.components.elastic import sample_displacement  # noqa: F401  (both modules sample alike)

INSTALL_HINT = ("elasticdeform is the optional reference implementation; install it with "
                "`bash scripts/setup.sh --test` or `.venv/bin/python -m pip install --no-binary elasticdeform "
                "-e '.[reference]'` (built from source: the registry's wheel fails under NumPy 2)")


def elasticdeform_torch() -> ModuleType:
    """``elasticdeform.torch``, imported on first use.

    Raises:
        ModuleNotFoundError: ``elasticdeform`` is not installed (the message says how to install it).
    """
    try:
        return importlib.import_module("elasticdeform.torch")
    except ModuleNotFoundError as error:
        if error.name not in ("elasticdeform", "elasticdeform.torch"):
            raise
        raise ModuleNotFoundError(INSTALL_HINT, name="elasticdeform") from None


def elastic_deform(x: torch.Tensor, displacement: torch.Tensor, order: int = 1) -> torch.Tensor:
    """Deform every channel of each sample of ``x`` with that sample's displacement grid.

    Differentiable with respect to ``x`` (the deformation is linear in ``x``; its
    gradient is the adjoint deformation computed by ``elasticdeform``).

    Args:
        x: ``[B, C, *spatial]`` float images or probability maps (2 or 3 spatial axes).
        displacement: ``[B, dims, *points]`` from :func:`sample_displacement`.
        order: spline interpolation order (1 linear, 0 nearest).

    Returns:
        Deformed ``x``, same shape, dtype and device; zeros where the deformation samples
        outside the field of view.

    Raises:
        ValueError: the displacement does not match the batch or the spatial dimensions.
        ModuleNotFoundError: ``elasticdeform`` is not installed.
    """
    dims = x.ndim - 2
    if displacement.shape[0] != x.shape[0] or displacement.shape[1] != dims:
        raise ValueError(f"displacement {tuple(displacement.shape)} does not match a batch "
                         f"{tuple(x.shape)} with {dims} spatial dimensions")
    axes = tuple(range(1, dims + 1))
    elastic_torch = elasticdeform_torch()
    deformed = [elastic_torch.deform_grid(sample.float(), grid, order=order, mode="constant", cval=0.0,
                                          axis=axes)
                for sample, grid in zip(x, displacement)]
    return torch.stack(deformed).to(x.dtype)


def elastic_deform_labels(labels: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Deform integer label maps ``[B, *spatial]`` with nearest-neighbour interpolation.

    Voxels sampled from outside the field of view become class 0 (background), as with
    :func:`semiseg.augment.warp_labels`.

    Args:
        labels: ``[B, *spatial]`` integer classes.
        displacement: ``[B, dims, *points]``.

    Returns:
        ``[B, *spatial]`` int64 labels.
    """
    with torch.no_grad():
        deformed = elastic_deform(labels.unsqueeze(1).float(), displacement, order=0)
    return deformed.squeeze(1).round().long()


def deformed_valid_mask(reference: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """``[B, 1, *spatial]`` mask of voxels that the deformation samples from inside the image.

    Args:
        reference: ``[B, C, *spatial]`` tensor giving shape, dtype and device.
        displacement: ``[B, dims, *points]``.

    Returns:
        Mask of ones and zeros in ``reference``'s dtype.
    """
    ones = torch.ones((reference.shape[0], 1, *reference.shape[2:]), device=reference.device)
    with torch.no_grad():
        deformed = elastic_deform(ones, displacement, order=1)
    return (deformed > 0.999).to(reference.dtype)
