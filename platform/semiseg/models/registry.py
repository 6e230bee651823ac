"""Registry of segmentation networks by name.

The built-in networks are listed here (their modules do not know the registry, so that the
registry imports them and never the other way round); :func:`register_model` adds others.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from semiseg.models.unet import build_unet
from semiseg.models.vnet import build_vnet

MODELS: dict[str, Callable[..., nn.Module]] = {"unet": build_unet, "vnet": build_vnet}
"""Registry name → network builder (keyword arguments of :func:`build_model` but ``name``)."""


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a network builder under ``name`` (besides the built-in ``unet`` and ``vnet``)."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = builder
        return builder

    return decorate


def build_model(name: str, *, dims: int, in_channels: int, num_classes: int, depth: int,
                width: int, dropout: float, norm: str) -> nn.Module:
    """Build a registered network.

    Args:
        name: registry name (``unet``, ...).
        dims: 2 for slices, 3 for volumes.
        in_channels: image channels.
        num_classes: output classes including background.
        depth: number of down-sampling stages.
        width: channels of the first stage (doubled at each stage).
        dropout: dropout probability in the deepest stages.
        norm: ``batch``, ``instance``, ``group`` or ``none``.

    Returns:
        The network; ``forward(x)`` returns logits ``[B, num_classes, *spatial]`` and
        ``forward(x, return_features=True)`` returns ``(logits, penultimate features)``.

    Raises:
        KeyError: unknown name (the message lists the registered ones).
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}")
    return MODELS[name](dims=dims, in_channels=in_channels, num_classes=num_classes,
                        depth=depth, width=width, dropout=dropout, norm=norm)
