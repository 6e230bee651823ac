"""A per-sample ensemble of past predictions, as temporal ensembling keeps it (Laine & Aila, ICLR 2017).

Each sample (a 2D slice, or a 3D volume whose patches are seen at varying origins) has an
exponential moving average ``Z`` of the network's predictions, kept on the CPU in the
sample's own (un-augmented) frame, voxel by voxel:

- during an epoch, :meth:`SampleEnsemble.accumulate` adds each prediction (a map of class
  probabilities over a window of the sample, with the voxels it really covers) to the
  epoch's running sum; a voxel seen several times in the epoch contributes the mean of its
  predictions;
- at the end of the epoch, :meth:`SampleEnsemble.update` sets ``Z ← αZ + (1 − α)z̄`` on every
  voxel seen that epoch and counts the update, ``t ← t + 1`` (once per epoch however often it
  was seen; a voxel not seen keeps its ``Z`` and ``t``);
- :meth:`SampleEnsemble.targets` reads the bias-corrected target ``Z / (1 − α^t)`` of a window
  (the paper's startup correction; ``Z`` starts at 0), with the voxels that have one (``t ≥ 1``).

A sample's arrays grow to the furthest window seen (zeros beyond), so the ensemble needs no
shapes in advance. Memory per sample of ``V`` voxels and ``C`` classes: ``4·C·V`` bytes for
``Z`` (float32) and ``2·V`` for ``t`` (int16), plus ``4·C·V + 4·V`` during an epoch for a sample
seen in it (the sums and counts).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

MAX_UPDATES = torch.iinfo(torch.int16).max


class SampleEnsemble:
    """Exponential moving averages of predictions, one per sample, updated once per epoch.

    Args:
        momentum: α, the weight of the past in ``Z ← αZ + (1 − α)z`` (in ``[0, 1)``).
        num_classes: channels of a prediction.

    Raises:
        ValueError: ``momentum`` outside ``[0, 1)`` or fewer than one class.
    """

    def __init__(self, momentum: float, num_classes: int) -> None:
        if not 0.0 <= momentum < 1.0 or num_classes < 1:
            raise ValueError(f"need 0 <= momentum < 1 and num_classes >= 1, got {momentum} and {num_classes}")
        self.momentum = float(momentum)
        self.num_classes = int(num_classes)
        self.averages: dict[int, torch.Tensor] = {}
        self.updates: dict[int, torch.Tensor] = {}
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        """Samples the ensemble holds (seen at least once; updated or not yet)."""
        return len(self.averages)

    def targets(self, indices: torch.Tensor, origins: torch.Tensor | None,
                size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Bias-corrected ensemble predictions ``Z / (1 − α^t)`` of a window of each sample.

        Args:
            indices: ``[B]`` sample keys.
            origins: ``[B, dims]`` first voxel of each window in its sample, or None (windows at 0).
            size: the windows' spatial size.

        Returns:
            ``targets [B, C, *size]`` float32 (0 where there is none) and ``known [B, 1, *size]``
            bool, true where the voxel has been updated at least once.
        """
        size = tuple(int(n) for n in size)
        targets = torch.zeros((len(indices), self.num_classes, *size))
        known = torch.zeros((len(indices), 1, *size), dtype=torch.bool)
        for row, (key, window) in enumerate(self._windows(indices, origins, size)):
            if key not in self.averages:
                continue
            self._grow(key, window)
            updates = self.updates[key][window].long()
            has = updates > 0
            correction = 1.0 - torch.pow(torch.tensor(self.momentum, dtype=torch.float64), updates)
            targets[row] = torch.where(has, self.averages[key][(slice(None), *window)] / correction.clamp_min(1e-12)
                                       .float(), torch.zeros(()))
            known[row, 0] = has
        return targets, known

    def accumulate(self, indices: torch.Tensor, origins: torch.Tensor | None, predictions: torch.Tensor,
                   covered: torch.Tensor) -> None:
        """Add predictions of windows of samples to this epoch's sums.

        Args:
            indices: ``[B]`` sample keys.
            origins: ``[B, dims]`` first voxel of each window, or None (windows at 0).
            predictions: ``[B, C, *size]`` class probabilities in the samples' frame.
            covered: ``[B, 1, *size]`` voxels the predictions really cover (others are ignored).
        """
        predictions = predictions.detach().float().cpu()
        covered = covered.detach().cpu().to(torch.float32)
        for row, (key, window) in enumerate(self._windows(indices, origins, predictions.shape[2:])):
            self._grow(key, window)
            if key not in self.sums:
                self.sums[key] = torch.zeros_like(self.averages[key])
                self.counts[key] = torch.zeros(self.averages[key].shape[1:])
            self.sums[key][(slice(None), *window)] += predictions[row] * covered[row]
            self.counts[key][window] += covered[row, 0]

    def update(self) -> int:
        """End of an epoch: ``Z ← αZ + (1 − α)·mean`` and ``t ← t + 1`` on every voxel seen in it.

        Returns:
            How many samples were updated.
        """
        for key, sums in self.sums.items():
            counts = self.counts[key]
            seen = counts > 0
            mean = sums / counts.clamp_min(1.0)
            blended = self.momentum * self.averages[key] + (1.0 - self.momentum) * mean
            self.averages[key] = torch.where(seen, blended, self.averages[key])
            self.updates[key] = (self.updates[key] + seen.to(torch.int16)).clamp_max(MAX_UPDATES)
        updated = len(self.sums)
        self.sums, self.counts = {}, {}
        return updated

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (tensors and lists of tensors only)."""
        keys, pending = sorted(self.averages), sorted(self.sums)
        return {"keys": torch.tensor(keys, dtype=torch.int64),
                "averages": [self.averages[k] for k in keys], "updates": [self.updates[k] for k in keys],
                "pending_keys": torch.tensor(pending, dtype=torch.int64),
                "sums": [self.sums[k] for k in pending], "counts": [self.counts[k] for k in pending]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        keys, pending = [int(k) for k in state["keys"]], [int(k) for k in state["pending_keys"]]
        self.averages = {k: v.clone() for k, v in zip(keys, state["averages"])}
        self.updates = {k: v.clone() for k, v in zip(keys, state["updates"])}
        self.sums = {k: v.clone() for k, v in zip(pending, state["sums"])}
        self.counts = {k: v.clone() for k, v in zip(pending, state["counts"])}

    def nbytes(self) -> int:
        """Bytes held (ensembles and this epoch's sums)."""
        tensors = [*self.averages.values(), *self.updates.values(), *self.sums.values(), *self.counts.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _windows(self, indices: torch.Tensor, origins: torch.Tensor | None, size: Sequence[int]):
        starts = torch.zeros((len(indices), len(size)), dtype=torch.int64) if origins is None else origins.cpu()
        for key, start in zip(indices.cpu().tolist(), starts.tolist()):
            yield int(key), tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, size))

    def _grow(self, key: int, window: tuple[slice, ...]) -> None:
        """Make sample ``key``'s arrays (created as zeros) reach at least to the end of ``window``."""
        extent = tuple(w.stop for w in window)
        if key not in self.averages:
            self.averages[key] = torch.zeros((self.num_classes, *extent))
            self.updates[key] = torch.zeros(extent, dtype=torch.int16)
        current = tuple(self.updates[key].shape)
        if all(e <= c for e, c in zip(extent, current)):
            return
        grown = tuple(max(e, c) for e, c in zip(extent, current))
        self.averages[key] = _padded(self.averages[key], grown)
        self.updates[key] = _padded(self.updates[key], grown)
        if key in self.sums:
            self.sums[key] = _padded(self.sums[key], grown)
            self.counts[key] = _padded(self.counts[key], grown)


def _padded(array: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """``array`` (``[..., *old]``) zero-padded at the end of its last ``len(spatial)`` axes to ``spatial``."""
    out = array.new_zeros((*array.shape[:array.ndim - len(spatial)], *spatial))
    out[(..., *(slice(0, n) for n in array.shape[array.ndim - len(spatial):]))] = array
    return out
