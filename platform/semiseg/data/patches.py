"""Random 3D training patches with foreground oversampling (as in nnU-Net).

A patch is an exact sub-array of a volume. A fraction of the patches is centred on a
foreground voxel (a foreground class present in the volume is drawn first, then one of
its voxels, so that small classes are seen as often as large ones); the others are
uniform random crops. Volumes smaller than the patch along an axis are zero-padded
(label 0) symmetrically before cropping.

:class:`PatchSampler` pads the volumes and indexes their foreground once; the functions
:func:`sample_patches` and :func:`sample_patches_from_list` build one per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

Window = tuple[slice, ...]


@dataclass(frozen=True)
class PatchDraw:
    """Patches drawn by :meth:`PatchSampler.draw` and where each one comes from.

    Attributes:
        images: ``[count, C, *patch_size]``.
        labels: ``[count, *patch_size]``, or None without labels.
        volumes: ``[count]`` int64, the index of each patch's volume in the sampler's list.
        origins: ``[count, 3]`` int64, each patch's first voxel in its (padded) volume: the
            volume's own coordinates, shifted by the padding only along an axis where the
            volume is smaller than the patch.
        positions: ``[count]`` float32, the relative position of each patch's centre along
            the last spatial axis of its volume before padding: 0 at the first voxel, 1 at the
            last (clipped to ``[0, 1]``; 0 for a single-voxel axis).
    """

    images: np.ndarray
    labels: np.ndarray | None
    volumes: np.ndarray
    origins: np.ndarray
    positions: np.ndarray


class PatchSampler:
    """Draws patches from a fixed list of volumes of possibly different shapes.

    Args:
        volumes: ``[C, X, Y, Z]`` arrays.
        labels: ``[X, Y, Z]`` integer arrays matching ``volumes`` (0 is background), or None.
        patch_size: ``(X, Y, Z)`` of a patch.

    Raises:
        ValueError: no volumes, a volume is not 4-dimensional, labels do not match the
            volumes, or ``patch_size`` is not 3 positive sizes.
    """

    def __init__(self, volumes: Sequence[np.ndarray], labels: Sequence[np.ndarray] | None,
                 patch_size: Sequence[int]) -> None:
        self.patch_size = _check_patch(patch_size)
        _check_volumes(volumes, labels)
        self._depth_and_padding = [(volume.shape[-1], max(self.patch_size[2] - volume.shape[-1], 0) // 2)
                                   for volume in volumes]
        self.volumes = [_pad(volume, self.patch_size, 0) for volume in volumes]
        self.labels = None if labels is None else [_pad(label, self.patch_size, 0) for label in labels]
        self._foreground = None if self.labels is None else [_foreground_index(label) for label in self.labels]

    def sample(self, count: int, rng: np.random.Generator,
               foreground_fraction: float = 0.33) -> tuple[np.ndarray, np.ndarray | None]:
        """Draw ``count`` patches from volumes chosen uniformly with replacement.

        Each patch is centred on a foreground voxel with probability
        ``foreground_fraction`` when the sampler has labels and the chosen volume has
        foreground (nnU-Net forces the last third of each batch instead; a per-patch draw
        keeps the fraction for batches of one). The window is shifted back inside the
        volume, so the voxel stays in the patch but not always at its centre.

        Args:
            count: number of patches.
            rng: random generator (the only source of randomness).
            foreground_fraction: probability of a foreground-centred patch, in ``[0, 1]``.

        Returns:
            Images ``[count, C, *patch_size]`` and labels ``[count, *patch_size]`` (None
            without labels), with the dtypes of the inputs.

        Raises:
            ValueError: ``count < 0`` or ``foreground_fraction`` outside ``[0, 1]``.
        """
        drawn = self.draw(count, rng, foreground_fraction)
        return drawn.images, drawn.labels

    def draw(self, count: int, rng: np.random.Generator, foreground_fraction: float = 0.33) -> PatchDraw:
        """:meth:`sample` (the same random draws), with each patch's volume, origin and relative position.

        Args:
            count, rng, foreground_fraction: as for :meth:`sample`.

        Returns:
            The patches and where they come from (:class:`PatchDraw`).

        Raises:
            ValueError: as :meth:`sample`.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        picks = [self._draw(rng, foreground_fraction) for _ in range(count)]
        images = self._stack([self.volumes[i][(slice(None), *w)] for i, w in picks], self.volumes[0])
        labels = None if self.labels is None else self._stack([self.labels[i][w] for i, w in picks], self.labels[0])
        origins = np.asarray([[w.start for w in window] for _, window in picks], np.int64).reshape(count, 3)
        return PatchDraw(images, labels, np.asarray([i for i, _ in picks], np.int64), origins,
                         np.asarray([self._relative_centre(i, window[2].start) for i, window in picks], np.float32))

    def _relative_centre(self, index: int, start: int) -> float:
        """Relative position along the last axis, in the unpadded volume ``index``, of the centre of a patch
        starting at ``start`` (padded coordinates)."""
        depth, padding = self._depth_and_padding[index]
        if depth <= 1:
            return 0.0
        centre = start + (self.patch_size[2] - 1) / 2.0 - padding
        return float(min(max(centre / (depth - 1), 0.0), 1.0))

    def _draw(self, rng: np.random.Generator, foreground_fraction: float) -> tuple[int, Window]:
        index = int(rng.integers(len(self.volumes)))
        shape = self.volumes[index].shape[1:]
        centre = None
        if self._foreground is not None and rng.random() < foreground_fraction:
            centre = _foreground_voxel(self._foreground[index], shape, rng)
        if centre is None:
            starts = [int(rng.integers(size - patch + 1)) for size, patch in zip(shape, self.patch_size)]
        else:
            starts = [min(max(c - patch // 2, 0), size - patch)
                      for c, size, patch in zip(centre, shape, self.patch_size)]
        return index, tuple(slice(s, s + p) for s, p in zip(starts, self.patch_size))

    def _stack(self, crops: list[np.ndarray], like: np.ndarray) -> np.ndarray:
        if not crops:
            return np.zeros((0, *like.shape[:-3], *self.patch_size), like.dtype)
        return np.stack(crops)


def sample_patches(volumes: np.ndarray, labels: np.ndarray | None, patch_size: Sequence[int], count: int,
                   rng: np.random.Generator,
                   foreground_fraction: float = 0.33) -> tuple[np.ndarray, np.ndarray | None]:
    """Random training patches from a stack of equally shaped volumes.

    Args:
        volumes: ``[N, C, X, Y, Z]`` images.
        labels: ``[N, X, Y, Z]`` integer labels (0 is background), or None.
        patch_size: ``(X, Y, Z)`` of a patch.
        count: number of patches.
        rng: random generator.
        foreground_fraction: probability that a patch is centred on a foreground voxel
            (ignored without labels).

    Returns:
        Images ``[count, C, *patch_size]`` and labels ``[count, *patch_size]`` (None without labels).

    Raises:
        ValueError: ``volumes`` is not 5-dimensional, shapes do not match, or an argument
            is out of range (see :class:`PatchSampler`).
    """
    if volumes.ndim != 5:
        raise ValueError(f"volumes must be [N, C, X, Y, Z], got shape {volumes.shape}")
    return sample_patches_from_list(list(volumes), None if labels is None else list(labels), patch_size,
                                    count, rng, foreground_fraction)


def sample_patches_from_list(volumes: Sequence[np.ndarray], labels: Sequence[np.ndarray] | None,
                             patch_size: Sequence[int], count: int, rng: np.random.Generator,
                             foreground_fraction: float = 0.33) -> tuple[np.ndarray, np.ndarray | None]:
    """Random training patches from volumes of different shapes.

    Args:
        volumes: ``[C, X, Y, Z]`` images (same ``C``).
        labels: ``[X, Y, Z]`` labels matching ``volumes``, or None.
        patch_size: ``(X, Y, Z)`` of a patch.
        count: number of patches.
        rng: random generator.
        foreground_fraction: probability that a patch is centred on a foreground voxel.

    Returns:
        Images ``[count, C, *patch_size]`` and labels ``[count, *patch_size]`` (None without labels).

    Raises:
        ValueError: see :class:`PatchSampler` and :meth:`PatchSampler.sample`.
    """
    return PatchSampler(volumes, labels, patch_size).sample(count, rng, foreground_fraction)


def _check_patch(patch_size: Sequence[int]) -> tuple[int, int, int]:
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch_size must be 3 positive sizes, got {tuple(patch_size)}")
    return patch  # type: ignore[return-value]


def _check_volumes(volumes: Sequence[np.ndarray], labels: Sequence[np.ndarray] | None) -> None:
    if len(volumes) == 0:
        raise ValueError("no volumes to sample patches from")
    if any(volume.ndim != 4 for volume in volumes):
        raise ValueError(f"volumes must be [C, X, Y, Z], got shapes {[v.shape for v in volumes]}")
    if len({volume.shape[0] for volume in volumes}) != 1:
        raise ValueError(f"volumes have different channel counts: {[v.shape[0] for v in volumes]}")
    if labels is None:
        return
    if len(labels) != len(volumes):
        raise ValueError(f"{len(labels)} label maps for {len(volumes)} volumes")
    for volume, label in zip(volumes, labels):
        if label.shape != volume.shape[1:]:
            raise ValueError(f"label shape {label.shape} does not match volume shape {volume.shape}")


def _pad(array: np.ndarray, patch_size: tuple[int, int, int], value: float) -> np.ndarray:
    """Pad the last three axes of ``array`` symmetrically with ``value`` up to ``patch_size``."""
    spatial = array.shape[-3:]
    if all(size >= patch for size, patch in zip(spatial, patch_size)):
        return array
    widths = [(0, 0)] * (array.ndim - 3)
    for size, patch in zip(spatial, patch_size):
        missing = max(patch - size, 0)
        widths.append((missing // 2, missing - missing // 2))
    return np.pad(array, widths, constant_values=value)


def _foreground_index(label: np.ndarray) -> list[np.ndarray]:
    """Flat indices of the voxels of each foreground class present in ``label``."""
    flat = label.reshape(-1)
    return [np.flatnonzero(flat == value) for value in np.unique(flat) if value > 0]


def _foreground_voxel(classes: list[np.ndarray], shape: Sequence[int],
                      rng: np.random.Generator) -> tuple[int, ...] | None:
    """A random voxel of a random foreground class, or None without foreground."""
    if not classes:
        return None
    voxels = classes[int(rng.integers(len(classes)))]
    return tuple(int(c) for c in np.unravel_index(int(voxels[rng.integers(len(voxels))]), tuple(shape)))
