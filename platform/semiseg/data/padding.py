"""Centred padding of training samples to one shape, with a per-channel background value."""

from __future__ import annotations

import numpy as np


def channel_minimum(image: np.ndarray, dims: int) -> np.ndarray:
    """Per-channel minimum of ``image [C, ...]``, shaped ``[C, 1, ...]`` to broadcast over ``dims`` axes."""
    return image.reshape(image.shape[0], -1).min(axis=1).reshape(-1, *[1] * dims)


def pad_centred(samples: np.ndarray, shape: tuple[int, ...], fill: np.ndarray | int) -> np.ndarray:
    """Pad the last ``len(shape)`` axes of ``samples`` to ``shape``, centred, with ``fill``.

    Raises:
        ValueError: ``samples`` is larger than ``shape`` on some axis.
    """
    have = samples.shape[-len(shape):]
    extra = [target - size for target, size in zip(shape, have)]
    if any(e < 0 for e in extra):
        raise ValueError(f"sample {tuple(have)} is larger than the training shape {tuple(shape)}")
    if not any(extra):
        return samples
    out = np.empty((*samples.shape[:-len(shape)], *shape), samples.dtype)
    out[...] = fill
    index = tuple(slice(e // 2, e // 2 + size) for e, size in zip(extra, have))
    out[(Ellipsis, *index)] = samples
    return out
