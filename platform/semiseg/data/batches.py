"""Batches that mix labelled and unlabelled samples, a disjoint part per DDP rank."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from semiseg.data.patches import PatchDraw, PatchSampler
from semiseg.data.stream import StreamSpec


def rank_indices(count: int, rank: int, world_size: int) -> np.ndarray:
    """Indices ``rank, rank + world, ...`` of a pool of ``count`` samples.

    When the pool is smaller than the world, every rank gets the whole pool rather than
    nothing (a tiny labelled set must still train every rank).
    """
    if count < world_size:
        return np.arange(count)
    return np.arange(rank, count, world_size)


@dataclass
class MixedBatchSampler:
    """Draws batches of ``labelled_per_batch`` labelled and ``unlabelled_per_batch`` unlabelled samples.

    Sampling is with replacement from this rank's part of each pool, from a generator
    seeded by ``(seed, rank, epoch)`` so a resumed epoch draws the same batches. With
    ``patch_size`` (3D), each sample is a random patch of a volume, a ``foreground_fraction``
    of the labelled ones centred on foreground (nnU-Net's oversampling). With
    ``unlabelled_stream`` the unlabelled samples come from this rank's
    :class:`semiseg.data.stream.StreamedPool` instead of ``unlabelled_images``.

    Every batch names its samples, for methods that keep per-sample state (temporal
    ensembling) or compare samples by where they lie (Chaitanya et al.'s domain-specific
    contrastive strategy); methods that do not need them ignore these keys:

    - ``index_l`` / ``index_u``: int64 ``[L]`` / ``[U]``, each sample's index in the whole
      labelled / unlabelled pool (``labelled_images`` / ``unlabelled_images``, the same on every
      rank; for a streamed pool see :class:`semiseg.data.stream.StreamDraw`);
    - ``position_l`` / ``position_u``: float32, the sample's relative position in its volume:
      ``labelled_positions`` / ``unlabelled_positions`` for whole samples (zeros when None; see
      :class:`semiseg.data.prepared.PreparedData`), the patch centre's along the last spatial
      axis for 3D patches;
    - with ``patch_size`` also ``origin_l`` / ``origin_u``: int64 ``[n, 3]``, each patch's first
      voxel in its volume (see :class:`semiseg.data.patches.PatchDraw`).
    """

    labelled_images: np.ndarray
    labelled_labels: np.ndarray
    unlabelled_images: np.ndarray
    labelled_per_batch: int
    unlabelled_per_batch: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    patch_size: tuple[int, int, int] | None = None
    foreground_fraction: float = 0.33
    unlabelled_stream: StreamSpec | None = None
    labelled_positions: np.ndarray | None = None
    unlabelled_positions: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.labelled_images) == 0:
            raise ValueError("no labelled samples to train on")
        self._pool = (self.unlabelled_stream.open(self.rank, self.world_size, self.seed)
                      if self.unlabelled_stream is not None and self.unlabelled_per_batch > 0 else None)
        self._labelled = rank_indices(len(self.labelled_images), self.rank, self.world_size)
        self._unlabelled = rank_indices(len(self.unlabelled_images), self.rank, self.world_size)
        if self.patch_size is not None:
            self._patches_l = PatchSampler([self.labelled_images[i] for i in self._labelled],
                                           [self.labelled_labels[i] for i in self._labelled], self.patch_size)
            self._patches_u = (PatchSampler([self.unlabelled_images[i] for i in self._unlabelled], None,
                                            self.patch_size) if len(self._unlabelled) else None)
            return
        self._positions_l = _positions(self.labelled_positions, len(self.labelled_images))
        self._positions_u = _positions(self.unlabelled_positions, len(self.unlabelled_images))
        self._labelled_t = torch.from_numpy(self.labelled_images)
        self._labels_t = torch.from_numpy(self.labelled_labels)
        self._unlabelled_t = torch.from_numpy(self.unlabelled_images)

    def epoch(self, epoch: int, steps: int, device: torch.device | str = "cpu"):
        """Yield ``steps`` batches for ``epoch`` as dicts ``image_l``, ``label_l`` (and ``image_u``)."""
        rng = np.random.default_rng([self.seed, self.rank, epoch])
        if self._pool is not None:
            self._pool.start_epoch(epoch)
        pin = torch.device(device).type == "cuda"
        for _ in range(steps):
            batch = self._patch_batch(rng) if self.patch_size is not None else self._sample_batch(rng)
            yield {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()}

    def _sample_batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        idx_l = rng.choice(self._labelled, self.labelled_per_batch)
        batch = {"image_l": self._labelled_t[idx_l], "label_l": self._labels_t[idx_l],
                 "index_l": torch.from_numpy(idx_l.astype(np.int64)),
                 "position_l": torch.from_numpy(self._positions_l[idx_l])}
        if self._pool is not None:
            drawn = self._pool.draw(self.unlabelled_per_batch)
            batch.update(image_u=torch.from_numpy(drawn.images), index_u=torch.from_numpy(drawn.indices),
                         position_u=torch.from_numpy(drawn.positions))
        elif self.unlabelled_per_batch > 0 and len(self._unlabelled) > 0:
            idx_u = rng.choice(self._unlabelled, self.unlabelled_per_batch)
            batch.update(image_u=self._unlabelled_t[idx_u], index_u=torch.from_numpy(idx_u.astype(np.int64)),
                         position_u=torch.from_numpy(self._positions_u[idx_u]))
        return batch

    def _patch_batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        drawn = self._patches_l.draw(self.labelled_per_batch, rng, self.foreground_fraction)
        batch = {"image_l": torch.from_numpy(drawn.images), "label_l": torch.from_numpy(drawn.labels).long(),
                 **_named(drawn, self._labelled, "l")}
        if self._pool is not None:
            volumes = self._pool.draw(self.unlabelled_per_batch)
            drawn_u = PatchSampler(list(volumes.images), None, self.patch_size).draw(len(volumes.images), rng, 0.0)
            batch.update(image_u=torch.from_numpy(drawn_u.images), **_named(drawn_u, volumes.indices, "u"))
        elif self.unlabelled_per_batch > 0 and self._patches_u is not None:
            drawn_u = self._patches_u.draw(self.unlabelled_per_batch, rng, 0.0)
            batch.update(image_u=torch.from_numpy(drawn_u.images), **_named(drawn_u, self._unlabelled, "u"))
        return batch


def _positions(positions: np.ndarray | None, count: int) -> np.ndarray:
    """Per-sample relative positions as float32 ``[count]`` (zeros when None).

    Raises:
        ValueError: ``positions`` does not have one entry per sample.
    """
    if positions is None:
        return np.zeros(count, np.float32)
    positions = np.asarray(positions, np.float32).reshape(-1)
    if len(positions) != count:
        raise ValueError(f"{len(positions)} positions for {count} samples")
    return positions


def _named(drawn: PatchDraw, pool_indices: np.ndarray, part: str) -> dict[str, torch.Tensor]:
    """``index_<part>``, ``origin_<part>`` and ``position_<part>`` of patches whose volumes are
    ``pool_indices[drawn.volumes]`` in the whole pool."""
    return {f"index_{part}": torch.from_numpy(np.asarray(pool_indices, np.int64)[drawn.volumes]),
            f"origin_{part}": torch.from_numpy(drawn.origins), f"position_{part}": torch.from_numpy(drawn.positions)}
