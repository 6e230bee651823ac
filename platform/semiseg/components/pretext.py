"""Pretext tasks of self-supervised pretraining: rotation prediction and jigsaw puzzles.

- Rotations (Gidaris et al., ICLR 2018; Taleb et al., NeurIPS 2020): in 2D, k·90° in the
  image plane, k ∈ {0, 1, 2, 3} (4 classes); in 3D, Taleb's 10 classes: the identity, and
  90°, 180°, 270° around each of the three axes (:data:`ROTATIONS_3D`, the set of the
  authors' ``rotate_batch_3d``). A quarter turn in a plane whose two sides differ would
  change the shape (and give the class away), so images are first cropped to their
  centred square / cube (:func:`centre_cube`), as the authors' 2D code crops to a square.
- Jigsaw puzzles (Noroozi & Favaro, ECCV 2016; 3D: Taleb et al.): the image is cut into a
  ``grid``×``grid`` (×``grid``) array of cells; one tile is taken in each cell, a little
  smaller than the cell at a random offset (:func:`tile_layout`, :func:`extract_tiles`:
  Noroozi's 64-pixel tiles in 75-pixel cells, so that no edge continues from one tile to
  the next), the tiles are shuffled by one permutation of a fixed set
  (:func:`maximal_hamming_permutations`: Noroozi's greedy selection of permutations far
  from each other in Hamming distance) and a classifier (:class:`JigsawHead`) predicts
  which permutation it was from the tiles' pooled encoder features.
- :func:`fit_to_encoder`: tiny tiles (a 16-pixel image gives 5-pixel cells) are enlarged
  by interpolation until every axis survives the encoder's ``depth`` poolings.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROTATION_PLANES_3D = ((3, 4), (2, 4), (2, 3))
"""Planes (tensor axes of ``[B, C, D, H, W]``) of the quarter turns around D, H and W."""

ROTATIONS_3D: tuple[tuple[int, tuple[int, int]], ...] = ((0, (3, 4)),) + tuple(
    (quarter_turns, plane) for plane in ROTATION_PLANES_3D for quarter_turns in (1, 2, 3))
"""Taleb et al.'s 10 3D rotation classes as ``(quarter turns, plane)``: the identity, then
90°, 180°, 270° around D, around H and around W."""

TILE_FRACTION = 64 / 75
"""Side of a jigsaw tile relative to its cell (Noroozi & Favaro: 64-pixel tiles in 75-pixel cells)."""

PERMUTATION_SEED = 2016
"""Seed of the candidate permutations when the tiles are too many to enumerate them all:
fixed, so that every worker and a resumed run build the same set."""

ENUMERATION_LIMIT = 10 ** 6
"""Up to this many permutations (9! = 362 880) all are candidates; beyond (27 tiles), a random sample."""


def rotation_classes(dims: int) -> int:
    """How many rotations the rotation task tells apart: 4 in 2D, 10 in 3D.

    Raises:
        ValueError: ``dims`` is not 2 or 3.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    return 4 if dims == 2 else len(ROTATIONS_3D)


def rotate(x: torch.Tensor, label: int, dims: int) -> torch.Tensor:
    """Rotate ``x`` ``[B, C, *spatial]`` by rotation class ``label``.

    2D: ``label`` quarter turns counter-clockwise in the (H, W) plane (``torch.rot90``);
    3D: :data:`ROTATIONS_3D` ``[label]``. A quarter turn swaps two axes, so they must
    have the same size unless ``label`` is a half turn or the identity (see
    :func:`centre_cube`).

    Raises:
        ValueError: ``label`` outside ``[0, rotation_classes(dims))`` or ``x`` without ``dims`` spatial axes.
    """
    if x.ndim != dims + 2:
        raise ValueError(f"expected [B, C] + {dims} spatial axes, got shape {tuple(x.shape)}")
    if not 0 <= label < rotation_classes(dims):
        raise ValueError(f"rotation class {label} outside [0, {rotation_classes(dims)})")
    quarter_turns, plane = (label, (2, 3)) if dims == 2 else ROTATIONS_3D[label]
    return torch.rot90(x, quarter_turns, dims=plane)


def rotate_each(images: torch.Tensor, labels: torch.Tensor, dims: int) -> torch.Tensor:
    """Rotate image ``i`` of ``images`` (a square / cube) by rotation class ``labels[i]``."""
    rotated = torch.empty_like(images)
    for label in labels.unique().tolist():
        chosen = labels == label
        rotated[chosen] = rotate(images[chosen], int(label), dims)
    return rotated


def centre_cube(x: torch.Tensor) -> torch.Tensor:
    """The centred square (2D) / cube (3D) of ``x`` ``[B, C, *spatial]`` whose side is the smallest axis."""
    side = min(x.shape[2:])
    region = tuple(slice((size - side) // 2, (size - side) // 2 + side) for size in x.shape[2:])
    return x[(slice(None), slice(None)) + region]


def fit_to_encoder(x: torch.Tensor, minimum: int) -> torch.Tensor:
    """Enlarge (linear interpolation) every spatial axis of ``x`` shorter than ``minimum``.

    An encoder with ``depth`` poolings by 2 needs ``minimum = 2**depth`` voxels per axis.
    """
    shape = x.shape[2:]
    if all(size >= minimum for size in shape):
        return x
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    return F.interpolate(x, size=[max(size, minimum) for size in shape], mode=mode, align_corners=False)


def tile_layout(shape: Sequence[int], grid: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Cell and tile sides per axis for a ``grid`` per axis jigsaw of an image of spatial ``shape``.

    The cell is ``size // grid`` (the remainder at the far end is not used); the tile is
    :data:`TILE_FRACTION` of the cell, rounded (at least 1), which leaves no gap in cells
    of 3 voxels or fewer.

    Raises:
        ValueError: an axis shorter than ``grid``.
    """
    if any(size < grid for size in shape):
        raise ValueError(f"an image of shape {tuple(shape)} cannot be cut into {grid} tiles per axis")
    cells = tuple(size // grid for size in shape)
    tiles = tuple(max(1, round(cell * TILE_FRACTION)) for cell in cells)
    return cells, tiles


def grid_positions(dims: int, grid: int) -> list[tuple[int, ...]]:
    """Cell indices in the order tiles are numbered: row-major (the last axis fastest)."""
    return list(itertools.product(range(grid), repeat=dims))


def extract_tiles(images: torch.Tensor, grid: int, cells: Sequence[int], tiles: Sequence[int],
                  offsets: torch.Tensor) -> torch.Tensor:
    """Cut one tile per cell out of every image.

    Args:
        images: ``[N, C, *spatial]``.
        grid: cells per axis.
        cells: cell side per axis.
        tiles: tile side per axis (at most the cell's).
        offsets: ``[N, grid**dims, dims]`` integer position of each tile inside its cell
            (``0 … cell − tile``), tiles in :func:`grid_positions` order.

    Returns:
        ``[N, grid**dims, C, *tiles]``, tile ``t`` of image ``n`` starting at
        ``position_t · cells + offsets[n, t]``.
    """
    dims = images.ndim - 2
    positions = grid_positions(dims, grid)
    rows = []
    for n in range(images.shape[0]):
        row = []
        for t, position in enumerate(positions):
            starts = [p * cell + int(o) for p, cell, o in zip(position, cells, offsets[n, t])]
            region = tuple(slice(start, start + tile) for start, tile in zip(starts, tiles))
            row.append(images[(n, slice(None)) + region])
        rows.append(torch.stack(row))
    return torch.stack(rows)


def permute_tiles(tiles: torch.Tensor, permutations: torch.Tensor) -> torch.Tensor:
    """Shuffle the tiles of each image: ``out[n, i] = tiles[n, permutations[n, i]]``.

    Args:
        tiles: ``[N, T, ...]``.
        permutations: ``[N, T]`` each row a permutation of ``0 … T − 1``.
    """
    index = permutations.to(tiles.device).long().view(*permutations.shape, *(1,) * (tiles.ndim - 2))
    return torch.gather(tiles, 1, index.expand_as(tiles))


def normalise_tiles(tiles: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit standard deviation per tile and channel (Noroozi & Favaro normalise
    each tile independently, so that tiles cannot be matched by their low-level statistics).

    Args:
        tiles: ``[N, T, C, *tile]``.
    """
    spatial = tuple(range(3, tiles.ndim))
    mean = tiles.mean(dim=spatial, keepdim=True)
    std = tiles.std(dim=spatial, keepdim=True, unbiased=False)
    return (tiles - mean) / (std + eps)


def hamming_distances(permutations: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """``[P, Q]`` number of positions where permutation ``p`` and ``q`` differ."""
    return (permutations[:, None, :] != others[None, :, :]).sum(dim=2)


@functools.lru_cache(maxsize=8)
def _maximal_hamming_permutations(num_tiles: int, count: int, candidates: int) -> torch.Tensor:
    if math.factorial(num_tiles) <= ENUMERATION_LIMIT:
        pool = np.array(list(itertools.permutations(range(num_tiles))), dtype=np.uint8)
    else:
        rng = np.random.default_rng(PERMUTATION_SEED)
        pool = rng.random((candidates, num_tiles)).argsort(axis=1).astype(np.uint8)
        pool[0] = np.arange(num_tiles)
    if count > pool.shape[0]:
        raise ValueError(f"{count} permutations asked of a pool of {pool.shape[0]} ({num_tiles} tiles)")
    columns = [np.ascontiguousarray(pool[:, position]) for position in range(num_tiles)]

    def distances_to(index: int) -> np.ndarray:
        distance = np.zeros(pool.shape[0], dtype=np.uint8)
        for position, column in enumerate(columns):
            np.add(distance, column != pool[index, position], out=distance, casting="unsafe")
        return distance

    chosen = [0]
    minimum = distances_to(0)
    total = minimum.astype(np.int64)
    for _ in range(count - 1):
        score = np.where(minimum == minimum.max(), total, -1)
        index = int(score.argmax())
        chosen.append(index)
        distance = distances_to(index)
        np.minimum(minimum, distance, out=minimum)
        total += distance
    return torch.from_numpy(pool[chosen].astype(np.int64))


def maximal_hamming_permutations(num_tiles: int, count: int, candidates: int = 10_000) -> torch.Tensor:
    """A fixed set of ``count`` permutations of ``num_tiles`` tiles far apart in Hamming distance.

    Greedy max–min selection: start with the identity; then repeatedly add the candidate
    whose minimum Hamming distance to the permutations already chosen is the largest
    (ties: the largest sum of distances, then the first candidate). Noroozi & Favaro's
    Algorithm 1 adds the candidate of largest *mean* distance; maximising the minimum
    keeps the closest two classes apart, the statistic their Table 3 relates to accuracy.
    The candidates are all ``num_tiles!`` permutations when that is at most
    :data:`ENUMERATION_LIMIT` (9 tiles), else ``candidates`` random permutations drawn
    with :data:`PERMUTATION_SEED` (27 tiles). Deterministic: every worker, and a resumed
    run, build the same set. Cached per arguments.

    Args:
        num_tiles: tiles per puzzle (9 in 2D, 27 in 3D).
        count: permutations to choose (the classes of the jigsaw task).
        candidates: size of the random pool when the permutations are not enumerated.

    Returns:
        ``[count, num_tiles]`` int64, row 0 the identity, all rows distinct.

    Raises:
        ValueError: ``count`` < 1 or more than the candidates.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return _maximal_hamming_permutations(num_tiles, count, max(candidates, count)).clone()


class RotationHead(nn.Module):
    """Rotation classifier: global average pooling of the bottleneck, then a linear layer.

    Args:
        in_channels: channels of the bottleneck features.
        num_classes: rotation classes (:func:`rotation_classes`).
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, F, *spatial]`` feature maps → ``[B, num_classes]`` logits."""
        return self.linear(features.flatten(2).mean(dim=2))


class JigsawHead(nn.Module):
    """Permutation classifier of Noroozi & Favaro's context-free network, after the shared encoder.

    Each tile's pooled bottleneck vector goes through a shared Linear → ReLU (their fc6),
    the ``num_tiles`` results are concatenated in the shuffled order, then Linear → ReLU
    (fc7) and Linear to one logit per permutation (fc8).

    Args:
        in_channels: channels of the bottleneck features.
        num_tiles: tiles per puzzle.
        num_permutations: classes.
        hidden: width of fc6 (per tile) and fc7 (default: ``in_channels`` and ``4 * in_channels``).
    """

    def __init__(self, in_channels: int, num_tiles: int, num_permutations: int, hidden: int | None = None) -> None:
        super().__init__()
        tile_width = hidden or in_channels
        joint_width = 4 * tile_width
        self.num_tiles = num_tiles
        self.tile = nn.Sequential(nn.Linear(in_channels, tile_width), nn.ReLU(inplace=True))
        self.joint = nn.Sequential(nn.Linear(num_tiles * tile_width, joint_width), nn.ReLU(inplace=True),
                                   nn.Linear(joint_width, num_permutations))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[N · num_tiles, F, *spatial]`` tile features (image-major) → ``[N, num_permutations]`` logits."""
        pooled = self.tile(features.flatten(2).mean(dim=2))
        return self.joint(pooled.reshape(-1, self.num_tiles * pooled.shape[1]))
