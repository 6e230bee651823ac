"""Sliding-window inference of a 3D network over a whole volume (as in nnU-Net).

The volume is tiled with patches that overlap by a given fraction, the last patch of
each axis flush with the border; volumes smaller than the patch are zero-padded. The
softmax probabilities of the tiles are accumulated with an importance map (a Gaussian
with σ = patch / 8 that trusts tile centres more than their borders, or uniform) and
divided by the accumulated weights, so overlapping tiles average correctly.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Window = tuple[slice, slice, slice]


def tile_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start offsets of the tiles along one axis.

    The tiles are spaced evenly at most ``patch * (1 - overlap)`` apart; the first starts
    at 0 and the last ends at ``size``.

    Args:
        size: length of the axis.
        patch: length of a tile.
        overlap: fraction of a tile shared with its neighbour, in ``[0, 1)``.

    Returns:
        Sorted offsets; ``[0]`` when ``size <= patch``.

    Raises:
        ValueError: ``patch < 1`` or ``overlap`` outside ``[0, 1)``.
    """
    if patch < 1:
        raise ValueError(f"patch sizes must be >= 1, got {patch}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((size - patch) / step) + 1
    spacing = (size - patch) / (count - 1)
    return [int(round(index * spacing)) for index in range(count)]


def importance_map(patch_size: Sequence[int], gaussian: bool = True, sigma_scale: float = 1 / 8) -> torch.Tensor:
    """Weights of the voxels of a tile.

    Args:
        patch_size: ``(X, Y, Z)`` of a tile.
        gaussian: a Gaussian centred on the tile with σ = ``sigma_scale * patch`` per axis
            (nnU-Net), normalised to a maximum of 1; otherwise ones.
        sigma_scale: σ as a fraction of the patch size.

    Returns:
        ``[X, Y, Z]`` float32 weights, all > 0.
    """
    if not gaussian:
        return torch.ones(tuple(patch_size), dtype=torch.float32)
    weights = torch.ones((), dtype=torch.float64)
    for axis, size in enumerate(patch_size):
        coordinates = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        sigma = max(size * sigma_scale, 1e-6)
        profile = torch.exp(-0.5 * (coordinates / sigma) ** 2)
        shape = [1] * len(patch_size)
        shape[axis] = size
        weights = weights * profile.reshape(shape)
    weights = weights / weights.max()
    return weights.clamp_min(torch.finfo(torch.float32).tiny).float()


def tile_windows(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> list[Window]:
    """Windows of the tiles covering a volume of ``shape`` (at least ``patch_size``).

    Args:
        shape: ``(X, Y, Z)`` of the (padded) volume.
        patch_size: ``(X, Y, Z)`` of a tile, not larger than ``shape``.
        overlap: fraction shared by neighbouring tiles, in ``[0, 1)``.

    Returns:
        One ``(slice, slice, slice)`` per tile.
    """
    starts = [tile_starts(size, patch, overlap) for size, patch in zip(shape, patch_size)]
    return [tuple(slice(s, s + p) for s, p in zip(corner, patch_size))
            for corner in itertools.product(*starts)]


def accumulated_weights(shape: Sequence[int], patch_size: Sequence[int], overlap: float = 0.5,
                        gaussian: bool = True) -> torch.Tensor:
    """Sum of the tile importance maps over a volume (the normaliser of the inference).

    Args:
        shape: ``(X, Y, Z)`` of the volume (smaller volumes are padded to the patch).
        patch_size: ``(X, Y, Z)`` of a tile.
        overlap: fraction shared by neighbouring tiles.
        gaussian: Gaussian or uniform importance.

    Returns:
        ``[X, Y, Z]`` float32 weights, > 0 wherever some tile covers the voxel.
    """
    padded, crop = _padding(shape, patch_size)
    weight = importance_map(patch_size, gaussian)
    total = torch.zeros(padded, dtype=torch.float32)
    for window in tile_windows(padded, patch_size, overlap):
        total[window] += weight
    return total[crop]


@torch.no_grad()
def sliding_window_inference(model: nn.Module, image: np.ndarray | torch.Tensor, patch_size: Sequence[int],
                             overlap: float = 0.5, batch_size: int = 4, num_classes: int | None = None,
                             device: torch.device | str = "cpu", amp: bool = False,
                             gaussian: bool = True) -> torch.Tensor:
    """Class probabilities of a whole volume from patch-wise forward passes.

    The model is used as it is (put it in eval mode first); its logits are turned into
    softmax probabilities per tile, weighted by :func:`importance_map` and averaged.

    Args:
        model: network mapping ``[B, C, *patch_size]`` to logits ``[B, K, *patch_size]``.
        image: ``[C, X, Y, Z]`` volume (numpy or tensor).
        patch_size: ``(X, Y, Z)`` of a tile.
        overlap: fraction of a tile shared with its neighbours, in ``[0, 1)`` (0.5 in nnU-Net).
        batch_size: tiles per forward pass.
        num_classes: ``K``; taken from the first forward pass when None.
        device: where the model runs and the probabilities are accumulated.
        amp: autocast the forward passes on CUDA.
        gaussian: Gaussian importance weighting (σ = patch / 8); uniform otherwise.

    Returns:
        ``[K, X, Y, Z]`` float32 probabilities on ``device`` (summing to 1 over ``K``).

    Raises:
        ValueError: ``image`` is not ``[C, X, Y, Z]``, ``patch_size`` has not 3 entries,
            ``batch_size < 1``, ``overlap`` outside ``[0, 1)``, or the model's output
            does not have ``num_classes`` channels and the tile's spatial shape.
    """
    volume = _as_volume(image)
    patch = _check_patch(patch_size, batch_size)
    device = torch.device(device)
    padded_shape, crop = _padding(volume.shape[1:], patch)
    volume = _pad_volume(volume, padded_shape)
    weight = importance_map(patch, gaussian).to(device)
    windows = tile_windows(padded_shape, patch, overlap)
    probabilities: torch.Tensor | None = None
    normaliser = torch.zeros(padded_shape, dtype=torch.float32, device=device)
    for first in range(0, len(windows), batch_size):
        batch = windows[first:first + batch_size]
        tiles = torch.stack([volume[(slice(None), *window)] for window in batch]).to(device)
        predicted = _tile_probabilities(model, tiles, device, amp, num_classes, patch)
        if probabilities is None:
            probabilities = torch.zeros((predicted.shape[1], *padded_shape), dtype=torch.float32, device=device)
        for window, tile in zip(batch, predicted):
            probabilities[(slice(None), *window)] += tile * weight
            normaliser[window] += weight
    assert probabilities is not None
    return (probabilities / normaliser)[(slice(None), *crop)]


def _tile_probabilities(model: nn.Module, tiles: torch.Tensor, device: torch.device, amp: bool,
                        num_classes: int | None, patch: tuple[int, int, int]) -> torch.Tensor:
    with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
        logits = model(tiles)
    if logits.ndim != 5 or tuple(logits.shape[2:]) != patch:
        raise ValueError(f"the model returned {tuple(logits.shape)} for tiles {tuple(tiles.shape)}; "
                         "expected [B, K, *patch_size] logits")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"the model returned {logits.shape[1]} channels, expected num_classes={num_classes}")
    return F.softmax(logits.float(), dim=1)


def _as_volume(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    volume = torch.as_tensor(image)
    if volume.ndim != 4:
        raise ValueError(f"image must be [C, X, Y, Z], got shape {tuple(volume.shape)}")
    return volume.float()


def _check_patch(patch_size: Sequence[int], batch_size: int) -> tuple[int, int, int]:
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch_size must be 3 positive sizes, got {tuple(patch_size)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return patch  # type: ignore[return-value]


def _padding(shape: Sequence[int], patch_size: Sequence[int]) -> tuple[tuple[int, ...], Window]:
    """Shape padded to at least the patch, and the window of the original volume in it."""
    padded = tuple(max(int(s), int(p)) for s, p in zip(shape, patch_size))
    crop = tuple(slice((q - s) // 2, (q - s) // 2 + s) for s, q in zip(shape, padded))
    return padded, crop  # type: ignore[return-value]


def _pad_volume(volume: torch.Tensor, padded_shape: Sequence[int]) -> torch.Tensor:
    """Zero-pad ``[C, X, Y, Z]`` symmetrically to ``padded_shape``."""
    pad: list[int] = []
    for size, target in reversed(list(zip(volume.shape[1:], padded_shape))):
        before = (target - size) // 2
        pad.extend([before, target - size - before])
    return F.pad(volume, pad) if any(pad) else volume
