"""Batches that mix labelled and unlabelled samples, a disjoint part per DDP rank."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
    seeded by ``(seed, rank, epoch)`` so a resumed epoch draws the same batches.
    """

    labelled_images: np.ndarray
    labelled_labels: np.ndarray
    unlabelled_images: np.ndarray
    labelled_per_batch: int
    unlabelled_per_batch: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.labelled_images) == 0:
            raise ValueError("no labelled samples to train on")
        self._labelled = rank_indices(len(self.labelled_images), self.rank, self.world_size)
        self._unlabelled = rank_indices(len(self.unlabelled_images), self.rank, self.world_size)
        self._labelled_t = torch.from_numpy(self.labelled_images)
        self._labels_t = torch.from_numpy(self.labelled_labels)
        self._unlabelled_t = torch.from_numpy(self.unlabelled_images)

    def epoch(self, epoch: int, steps: int, device: torch.device | str = "cpu"):
        """Yield ``steps`` batches for ``epoch`` as dicts ``image_l``, ``label_l`` (and ``image_u``)."""
        rng = np.random.default_rng([self.seed, self.rank, epoch])
        pin = torch.device(device).type == "cuda"
        for _ in range(steps):
            idx_l = torch.from_numpy(rng.choice(self._labelled, self.labelled_per_batch))
            batch = {"image_l": self._labelled_t[idx_l], "label_l": self._labels_t[idx_l]}
            if self.unlabelled_per_batch > 0 and len(self._unlabelled) > 0:
                idx_u = torch.from_numpy(rng.choice(self._unlabelled, self.unlabelled_per_batch))
                batch["image_u"] = self._unlabelled_t[idx_u]
            yield {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()}
