"""Fixtures of the method tests: a tiny build context (a 2-level, 4-channel U-Net on CPU)."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from semiseg.augment import AugmentSettings
from semiseg.methods import BuildContext


def _tiny_context(dims: int = 2, num_classes: int = 2, *, seed: int = 0, dropout: float = 0.1,
                  augment: AugmentSettings | None = None, rampup_epochs: float = 0.0,
                  rampup_shape: str | None = None, **overrides: Any) -> BuildContext:
    """A build context for a seconds-long method test.

    Args:
        dims, num_classes, seed: as in :class:`semiseg.methods.BuildContext`.
        dropout: of the U-Net.
        augment: default :class:`semiseg.augment.AugmentSettings` when ``None``.
        rampup_epochs: 0 (no ramp-up) by default.
        rampup_shape: ``sigmoid`` with a ramp-up, ``none`` without, unless given.
        overrides: any other :class:`BuildContext` field (``in_channels``, ``supervised_loss``...).
    """
    if rampup_shape is None:
        rampup_shape = "sigmoid" if rampup_epochs else "none"
    fields = {"in_channels": 1, **overrides}
    return BuildContext(dims=dims, num_classes=num_classes,
                        model={"name": "unet", "depth": 2, "width": 4, "dropout": dropout, "norm": "batch"},
                        augment=augment or AugmentSettings(), rampup_epochs=rampup_epochs,
                        rampup_shape=rampup_shape, seed=seed, **fields)


@pytest.fixture()
def tiny_context() -> Callable[..., BuildContext]:
    """Factory ``tiny_context(dims=2, num_classes=2, *, seed=0, dropout=0.1, augment=None, ...)``."""
    return _tiny_context
