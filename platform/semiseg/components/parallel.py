"""What every layer needs to know about ``DistributedDataParallel``: the network inside it."""

from __future__ import annotations

from torch import nn


def unwrapped(module: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` wrapper (``module`` itself when unwrapped)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
