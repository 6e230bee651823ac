"""U-Net (Ronneberger et al., MICCAI 2015) for 2D slices or 3D volumes.

Configurable depth, width, dropout and normalisation; odd spatial sizes are handled by
padding the up-sampled maps to their skip connection.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv2d if dims == 2 else nn.Conv3d


NORMS = ("batch", "instance", "group", "none")
"""The normalisation layers a network can use (``model.norm``)."""


def make_norm(norm: str, dims: int, channels: int) -> nn.Module:
    """Return the normalisation layer named ``norm`` for ``channels`` features.

    Raises:
        ValueError: unknown normalisation name.
    """
    if norm == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
    if norm == "instance":
        return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if norm == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {norm!r}; use one of {', '.join(NORMS)}")


class ConvBlock(nn.Sequential):
    """Two (conv 3, norm, LeakyReLU) layers with optional dropout between them."""

    def __init__(self, dims: int, cin: int, cout: int, norm: str, dropout: float) -> None:
        conv = _conv(dims)
        dropout_layer: nn.Module = (nn.Dropout2d if dims == 2 else nn.Dropout3d)(dropout) \
            if dropout > 0 else nn.Identity()
        super().__init__(
            conv(cin, cout, 3, padding=1, bias=norm == "none"), make_norm(norm, dims, cout),
            nn.LeakyReLU(0.01, inplace=True), dropout_layer,
            conv(cout, cout, 3, padding=1, bias=norm == "none"), make_norm(norm, dims, cout),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNet(nn.Module):
    """U-Net with ``depth`` down-sampling stages.

    Dropout is applied in the two deepest stages (where it regularises most and where
    stochastic teacher passes of UA-MT draw their variation).
    """

    def __init__(self, *, dims: int, in_channels: int, num_classes: int, depth: int = 3,
                 width: int = 16, dropout: float = 0.0, norm: str = "batch") -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.dims = dims
        self.depth = depth
        channels = [width * 2 ** i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        cin = in_channels
        for level, cout in enumerate(channels):
            level_dropout = dropout if level >= depth - 1 else 0.0
            self.encoders.append(ConvBlock(dims, cin, cout, norm, level_dropout))
            cin = cout
        up = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            self.ups.append(up(channels[level + 1], channels[level], 2, stride=2))
            self.decoders.append(ConvBlock(dims, channels[level] * 2, channels[level], norm, 0.0))
        self.head = _conv(dims)(channels[0], num_classes, 1)
        self.feature_channels = channels[0]
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)

    def forward(self, x: torch.Tensor, return_features: bool = False, encode_only: bool = False,
                decoder_features: bool = False, decoder_blocks: int | None = None, frozen_encoder: bool = False):
        """Segment ``x`` of shape ``[B, C, *spatial]``.

        Args:
            x: images.
            return_features: also return the penultimate per-pixel feature maps.
            encode_only: stop at the bottleneck and return its feature maps (encoder
                pretraining); going through ``forward`` keeps DDP's gradient hooks working.
            decoder_features: return the outputs of the decoder blocks instead of logits
                (decoder pretraining); the segmentation head is not run.
            decoder_blocks: with ``decoder_features``, run only the first ``decoder_blocks``
                blocks (all when ``None``), so that no later block takes part in the pass.
            frozen_encoder: run the encoder without recording gradients: the bottleneck and
                the skip connections reach the decoder detached (decoder pretraining on a
                frozen encoder; under DDP the encoder then counts as unused).

        Returns:
            Logits ``[B, num_classes, *spatial]``; ``(logits, features)`` when
            ``return_features``; the bottleneck ``[B, F, *spatial / 2**depth]`` when
            ``encode_only``; with ``decoder_features`` the list of decoder block outputs,
            coarsest first (block ``i``, 1-based, is ``[B, width * 2**(depth - i), *spatial / 2**(depth - i)]``).

        Raises:
            ValueError: ``decoder_blocks`` outside 1 … ``depth``.
        """
        if decoder_blocks is not None and not 1 <= decoder_blocks <= self.depth:
            raise ValueError(f"decoder_blocks must be in 1..{self.depth}, got {decoder_blocks}")
        with torch.no_grad() if frozen_encoder else contextlib.nullcontext():
            x, skips = self._encode(x)
        if encode_only:
            return x
        blocks = self.depth if decoder_blocks is None or not decoder_features else decoder_blocks
        outputs = []
        for up, decoder, skip in list(zip(self.ups, self.decoders, reversed(skips)))[:blocks]:
            x = up(x)
            x = _pad_to(x, skip)
            x = decoder(torch.cat([skip, x], dim=1))
            outputs.append(x)
        if decoder_features:
            return outputs
        logits = self.head(x)
        return (logits, x) if return_features else logits

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The bottleneck of ``x`` and the skip connections, shallowest first."""
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x)
            if level < self.depth:
                skips.append(x)
                x = self.pool(x)
        return x, skips


def _pad_to(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    diff = [r - s for r, s in zip(reference.shape[2:], x.shape[2:])]
    if not any(diff):
        return x
    pad: list[int] = []
    for d in reversed(diff):
        pad.extend([d // 2, d - d // 2])
    return F.pad(x, pad)


def build_unet(**kwargs) -> UNet:
    """Build a :class:`UNet` (registry entry ``unet``)."""
    return UNet(**kwargs)
