"""Training and evaluation data read from the Parquet cache as needed, for datasets larger than memory.

The setting the platform is built for has a few labelled scans and many unlabelled ones,
so only the unlabelled pool can outgrow memory: the labelled samples stay in memory and the
unlabelled ones stream.

- :class:`StreamedPool` deals this rank's share of the unlabelled rows (2D slices or 3D
  volumes) through a bounded shuffle buffer. Each epoch reads the cases in an order drawn
  from ``(seed, epoch)`` (the same on every rank, so the ranks' row groups stay disjoint,
  see :meth:`semiseg.data.cache.CachedDataset.iter_slices`) and refills the buffer from
  scratch, so an epoch's batches depend only on ``(seed, rank, epoch)`` and a resumed
  epoch draws the same batches as an uninterrupted one.
- :class:`LazyCases` is a sequence of evaluation cases that reads each case when it is
  indexed, so validation never holds more than one case per rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semiseg.data.cache import CachedDataset, CachedRow
from semiseg.data.padding import channel_minimum, pad_centred


@dataclass(frozen=True)
class StreamDraw:
    """Samples drawn by :meth:`StreamedPool.draw` and which rows they are.

    Attributes:
        images: ``[count, C, *sample_shape]`` float32.
        indices: ``[count]`` int64, each row's index in the whole unlabelled pool: the rows of
            the pool's cases in the split's order, slices in order, which is the index of the same
            sample in the in-memory ``PreparedData.unlabelled_images``.
        positions: ``[count]`` float32, a slice's relative position along the slicing axis
            (``slice_index / (slices - 1)``, 0 for a single slice); 0.5 for a volume row.
    """

    images: np.ndarray
    indices: np.ndarray
    positions: np.ndarray


@dataclass(frozen=True)
class StreamSpec:
    """Where a split's unlabelled samples stream from: the cache, the cases, the padded shape."""

    cache: Path
    case_ids: tuple[str, ...]
    sample_shape: tuple[int, ...]
    buffer_rows: int = 256

    def open(self, rank: int, world_size: int, seed: int) -> "StreamedPool":
        """This rank's pool."""
        return StreamedPool(self.cache, self.case_ids, self.sample_shape, rank=rank, world_size=world_size,
                            buffer_rows=self.buffer_rows, seed=seed)


class StreamedPool:
    """Unlabelled training samples streamed from a cache through a shuffle buffer.

    Args:
        cache: the cache folder (:attr:`semiseg.data.cache.CacheInfo.path`).
        case_ids: the unlabelled cases of the split.
        sample_shape: spatial shape every sample is padded to (centred, with the sample's
            own per-channel minimum), the shape of the in-memory training arrays.
        rank, world_size: this worker's share: disjoint row groups per rank (a pool with
            fewer row groups than ranks is read whole by every rank, as in memory).
        buffer_rows: most rows held at once; memory is ``buffer_rows`` samples.
        seed: seed of the case order and of the draws.
    """

    def __init__(self, cache: str | Path, case_ids: Sequence[str], sample_shape: tuple[int, ...], *,
                 rank: int = 0, world_size: int = 1, buffer_rows: int = 256, seed: int = 0) -> None:
        if buffer_rows < 1:
            raise ValueError(f"buffer_rows must be >= 1, got {buffer_rows}")
        self.dataset = CachedDataset(cache)
        self.case_ids = tuple(case_ids)
        self.sample_shape = tuple(int(n) for n in sample_shape)
        groups = sum(len(self.dataset.case_entry(cid)["row_groups"]) for cid in self.case_ids)
        if groups < world_size:
            rank, world_size = 0, 1
        self.rank, self.world_size = rank, world_size
        self.buffer_rows = buffer_rows
        self.seed = seed
        rows_per_case = [int(self.dataset.case_entry(cid)["rows"]) for cid in self.case_ids]
        self._first_row = dict(zip(self.case_ids, np.concatenate([[0], np.cumsum(rows_per_case)[:-1]]).tolist()))
        self._buffer: list[tuple[np.ndarray, int, float]] = []
        self._rows: Iterator[CachedRow] = iter(())
        self._rng = np.random.default_rng(0)
        self._epoch = 0
        self._passes = 0
        self.peak_rows = 0

    def __len__(self) -> int:
        """Rows of the pool over all ranks (from the cache's index; nothing is read)."""
        return self.dataset.num_rows(self.case_ids)

    def start_epoch(self, epoch: int) -> None:
        """Forget the buffer and start this epoch's pass over the cases."""
        self._epoch, self._passes = epoch, 0
        self._rng = np.random.default_rng([self.seed, self.rank, epoch, 1])
        self._buffer = []
        self._rows = self._next_pass()

    def draw(self, count: int) -> StreamDraw:
        """``count`` samples (``images`` ``[count, C, *sample_shape]`` float32), each from the buffer, with
        each sample's index in the whole pool and its relative position.

        Distinct buffer slots are drawn (repeats only when ``count`` exceeds the buffer), and
        every drawn slot is refilled with the next streamed row, so within a pass a row is
        drawn at most once until the stream wraps to a new pass in a new order.

        Raises:
            ValueError: this rank's pool is empty.
        """
        self._fill()
        if not self._buffer:
            raise ValueError("the unlabelled pool of this rank is empty")
        size = len(self._buffer)
        picks = self._rng.choice(size, size=min(count, size), replace=False)
        if count > size:
            picks = np.concatenate([picks, self._rng.integers(0, size, count - size)])
        drawn = StreamDraw(np.stack([self._buffer[i][0] for i in picks]),
                           np.asarray([self._buffer[i][1] for i in picks], np.int64),
                           np.asarray([self._buffer[i][2] for i in picks], np.float32))
        for i in sorted(set(int(p) for p in picks)):
            row = self._next_row()
            if row is not None:
                self._buffer[i] = row
        return drawn

    def _fill(self) -> None:
        while len(self._buffer) < self.buffer_rows:
            row = self._next_row()
            if row is None:
                break
            self._buffer.append(row)
        self.peak_rows = max(self.peak_rows, len(self._buffer))

    def _next_row(self) -> tuple[np.ndarray, int, float] | None:
        for _attempt in range(2):
            row = next(self._rows, None)
            if row is not None:
                return pad_sample(row.image, self.sample_shape), *self._name(row)
            self._rows = self._next_pass()
        return None

    def _name(self, row: CachedRow) -> tuple[int, float]:
        """The row's index in the whole pool and its relative position (see :class:`StreamDraw`)."""
        if row.slice_index is None:
            return self._first_row[row.case_id], 0.5
        slices = int(self.dataset.case_entry(row.case_id)["rows"])
        return self._first_row[row.case_id] + int(row.slice_index), relative_position(int(row.slice_index), slices)

    def _next_pass(self) -> Iterator[CachedRow]:
        order = np.random.default_rng([self.seed, self._epoch, self._passes]).permutation(len(self.case_ids))
        self._passes += 1
        ids = [self.case_ids[i] for i in order]
        batch_rows = min(32, self.buffer_rows)
        for batch in self.dataset.iter_slices(ids, rank=self.rank, world_size=self.world_size, batch_rows=batch_rows):
            yield from batch


class LazyCases(Sequence):
    """Evaluation cases read from the cache one at a time, when indexed (a slice stays lazy).

    Args:
        dataset: the opened cache.
        case_ids: the cases, in order.
        to_case: turns a :class:`semiseg.data.preprocess.PreprocessedCase` into the
            evaluation case the loop uses.
    """

    def __init__(self, dataset: CachedDataset, case_ids: Sequence[str], to_case) -> None:
        self.dataset = dataset
        self.case_ids = tuple(case_ids)
        self._to_case = to_case

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LazyCases(self.dataset, self.case_ids[index], self._to_case)
        (case,) = self.dataset.read_cases([self.case_ids[index]])
        return self._to_case(case)


def relative_position(index: int, count: int) -> float:
    """``index / (count - 1)``: where slice ``index`` of ``count`` lies along its axis (0 when ``count`` is 1)."""
    return index / (count - 1) if count > 1 else 0.0


def pad_sample(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Pad ``image [C, *spatial]`` to ``shape``, centred, with each channel's minimum."""
    return pad_centred(image, shape, channel_minimum(image, len(shape)))


def unlabelled_bytes(dataset: CachedDataset, case_ids: Sequence[str]) -> int:
    """Bytes the cases take as float32 training arrays (from the cache's index; nothing is read)."""
    total = 0
    for case_id in case_ids:
        entry = dataset.case_entry(case_id)
        total += 4 * entry["channels"] * int(np.prod(entry["shape"]))
    return total
