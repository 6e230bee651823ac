"""Bringing maps predicted on spatially augmented views back to the frame of the original images.

:func:`semiseg.augment.warp` applies an affine ``theta`` that maps *output* positions to
the *input* positions they sample (``affine_grid``'s convention, in normalised
coordinates). A view ``warp(x, theta)`` and the original ``x`` have the same shape, so
the same normalised coordinates describe both, and warping a map predicted on the view
with the inverse affine puts it back on the grid of ``x``. Two views of one image, each
brought back with its own inverse, can then be compared voxel by voxel (the Π-model of
Laine & Aila, 2017, with a random spatial transform per pass).
"""

from __future__ import annotations

import torch

from semiseg.augment import valid_mask, warp


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """The inverse of each affine ``[B, dims, dims + 1]`` in :func:`semiseg.augment.warp`'s convention.

    ``theta = [A | b]`` maps an output position ``u`` to ``A u + b``; its inverse is
    ``[A⁻¹ | −A⁻¹ b]``, computed in float64 and returned in ``theta``'s dtype.

    Args:
        theta: ``[B, dims, dims + 1]`` invertible affine matrices.

    Returns:
        ``[B, dims, dims + 1]`` matrices, so that ``warp(warp(x, theta), invert_affine(theta))``
        is ``x`` wherever the view kept it inside the field of view (up to interpolation).
    """
    linear = theta[..., :-1].double()
    inverse = torch.linalg.inv(linear)
    translation = -(inverse @ theta[..., -1:].double())
    return torch.cat([inverse, translation], dim=-1).to(theta.dtype)


def to_original_frame(maps: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp ``maps`` predicted on the views ``warp(x, theta)`` back onto the grid of ``x``.

    Args:
        maps: ``[B, C, *spatial]`` float maps (probabilities) on the augmented views; the
            warp is differentiable, so gradients flow back into them.
        theta: ``[B, dims, dims + 1]`` the affines that made the views.

    Returns:
        ``(aligned, mask)``: ``aligned`` ``[B, C, *spatial]`` on the original grid (bilinear,
        zeros where the view does not reach), and ``mask`` ``[B, 1, *spatial]`` (``maps``'
        dtype), 1 where every view voxel the bilinear sample reads was itself sampled from
        inside the original field of view (so the aligned value comes from real image
        content, not from the view's zero padding), else 0.
    """
    inverse = invert_affine(theta)
    aligned = warp(maps, inverse)
    view_valid = valid_mask(maps, theta).to(torch.float32)
    mask = warp(view_valid, inverse.to(torch.float32)) > 0.999
    return aligned, mask.to(maps.dtype)
