"""V-Net for 3D volumes.

Reference: F. Milletari, N. Navab, S.-A. Ahmadi, "V-Net: Fully convolutional neural
networks for volumetric medical image segmentation", 3DV 2016.

Each stage is residual: 1–3 volumetric convolutions (5×5×5 in the paper; the kernel size
is configurable, 3 is allowed for speed) with PReLU non-linearities, whose output is
added to the stage input. Down-sampling uses stride-2 2×2×2 convolutions that double the
channels, up-sampling uses stride-2 2×2×2 transposed convolutions, and each decoder stage
works on the concatenation of the up-sampled maps and the encoder skip connection. With
``depth=4`` and ``width=16`` the stages have 1, 2, 3, 3, 3 (encoder) and 3, 3, 2, 1
(decoder) convolutions and 16 … 256 channels, as in the paper.

Departures from the paper, chosen for this platform:

- a configurable normalisation after every convolution (the paper has none; the
  widely used PyTorch port adds batch normalisation);
- the output is one 1×1×1 convolution of the last decoder stage (the paper adds a
  5×5×5 convolution to two channels first), so that ``return_features`` returns the maps
  that the head classifies linearly, as for :class:`semiseg.models.unet.UNet`;
- dropout (the paper has none) in the two deepest encoder stages, where UA-MT draws its
  stochastic teacher passes, as for the U-Net.
"""

from __future__ import annotations

import torch
from torch import nn

from semiseg.models.unet import _pad_to, make_norm


class _ChannelRepeat(nn.Module):
    """Repeat the channels ``times`` times (the paper's shortcut from 1 to 16 channels)."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` with its channels tiled ``times`` times."""
        return x.repeat(1, self.times, *([1] * (x.ndim - 2)))


def _shortcut(cin: int, cout: int) -> nn.Module:
    """Residual shortcut from ``cin`` to ``cout`` channels.

    Identity when the counts agree, channel repetition when ``cout`` is a multiple of
    ``cin`` (the paper's first stage), otherwise a 1×1×1 projection.
    """
    if cin == cout:
        return nn.Identity()
    if cout % cin == 0:
        return _ChannelRepeat(cout // cin)
    return nn.Conv3d(cin, cout, 1, bias=False)


class ResidualStage(nn.Module):
    """``num_convs`` (conv k×k×k, norm, PReLU) layers whose output is added to the input.

    The last convolution's activation is applied after the sum (as in ResNet); dropout,
    when enabled, follows the first activation.

    Args:
        cin: input channels.
        cout: output channels.
        num_convs: convolutions in the stage (≥ 1).
        kernel_size: odd convolution size.
        norm: normalisation name for :func:`semiseg.models.unet.make_norm`.
        dropout: ``Dropout3d`` probability (0 disables it).
    """

    def __init__(self, cin: int, cout: int, num_convs: int, kernel_size: int, norm: str,
                 dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = cin
        for index in range(num_convs):
            layers.extend([nn.Conv3d(channels, cout, kernel_size, padding=kernel_size // 2, bias=norm == "none"),
                           make_norm(norm, 3, cout)])
            if index < num_convs - 1:
                layers.append(nn.PReLU(cout))
            if index == 0 and dropout > 0:
                layers.append(nn.Dropout3d(dropout))
            channels = cout
        self.convs = nn.Sequential(*layers)
        self.shortcut = _shortcut(cin, cout)
        self.activation = nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``PReLU(convs(x) + shortcut(x))``."""
        return self.activation(self.convs(x) + self.shortcut(x))


def _resample(transposed: bool, cin: int, cout: int, norm: str) -> nn.Sequential:
    """Stride-2 2×2×2 (transposed) convolution, norm and PReLU."""
    conv = nn.ConvTranspose3d if transposed else nn.Conv3d
    return nn.Sequential(conv(cin, cout, 2, stride=2, bias=norm == "none"), make_norm(norm, 3, cout),
                         nn.PReLU(cout))


def _num_convs(level: int) -> int:
    """Convolutions of the stage at ``level`` (1, 2, then 3 from the third stage on)."""
    return min(level + 1, 3)


class VNet(nn.Module):
    """V-Net with ``depth`` down-sampling stages and ``width`` channels in the first one.

    Attributes:
        depth: number of down-sampling stages.
        encoders: the residual encoder stages (``depth + 1``, the last is the bottleneck).
        downs: the down-sampling convolutions (also exposed as ``pool``).
        feature_channels: channels of the penultimate maps (``2 * width``).
    """

    def __init__(self, *, dims: int, in_channels: int, num_classes: int, depth: int = 4,
                 width: int = 16, dropout: float = 0.0, norm: str = "batch", kernel_size: int = 5) -> None:
        super().__init__()
        _check_arguments(dims, depth, kernel_size)
        self.dims = dims
        self.depth = depth
        self.kernel_size = kernel_size
        channels = [width * 2 ** level for level in range(depth + 1)]
        self.encoders = nn.ModuleList(
            ResidualStage(in_channels if level == 0 else cout, cout, _num_convs(level), kernel_size, norm,
                          dropout if level >= depth - 1 else 0.0)
            for level, cout in enumerate(channels))
        self.downs = nn.ModuleList(_resample(False, channels[level], channels[level + 1], norm)
                                   for level in range(depth))
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        previous = channels[depth]
        for level in reversed(range(depth)):
            self.ups.append(_resample(True, previous, channels[level], norm))
            previous = 2 * channels[level]
            self.decoders.append(ResidualStage(previous, previous, _num_convs(level), kernel_size, norm, 0.0))
        self.head = nn.Conv3d(previous, num_classes, 1)
        self.feature_channels = previous

    @property
    def pool(self) -> nn.ModuleList:
        """The down-sampling convolutions (V-Net's counterpart of the U-Net's pooling)."""
        return self.downs

    def forward(self, x: torch.Tensor, return_features: bool = False, encode_only: bool = False):
        """Segment ``x`` of shape ``[B, C, X, Y, Z]``.

        Sizes that are not multiples of ``2**depth`` are handled like the U-Net's: the
        down-sampling floors them and the up-sampled maps are padded to their skip.

        Args:
            x: volumes.
            return_features: also return the penultimate per-voxel feature maps.
            encode_only: stop at the bottleneck and return its feature maps (encoder
                pretraining).

        Returns:
            Logits ``[B, num_classes, X, Y, Z]``; ``(logits, features)`` with features
            ``[B, 2 * width, X, Y, Z]`` when ``return_features``; the bottleneck
            ``[B, width * 2**depth, *floor(spatial / 2**depth)]`` when ``encode_only``.

        Raises:
            ValueError: ``x`` is not 5-dimensional or a spatial size is below ``2**depth``.
        """
        self._check_input(x)
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x)
            if level < self.depth:
                skips.append(x)
                x = self.downs[level](x)
        if encode_only:
            return x
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = decoder(torch.cat([skip, _pad_to(up(x), skip)], dim=1))
        logits = self.head(x)
        return (logits, x) if return_features else logits

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"V-Net expects [B, C, X, Y, Z] volumes, got shape {tuple(x.shape)}")
        smallest = 2 ** self.depth
        if min(x.shape[2:]) < smallest:
            raise ValueError(f"V-Net of depth {self.depth} needs spatial sizes >= {smallest}, "
                             f"got {tuple(x.shape[2:])}")


def _check_arguments(dims: int, depth: int, kernel_size: int) -> None:
    if dims != 3:
        raise ValueError(f"V-Net is a 3D network: set data.dims = 3 (got dims={dims}); "
                         "use model.name = unet for 2D slices")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number (5 in the paper, 3 for speed), "
                         f"got {kernel_size}")


def build_vnet(**kwargs) -> VNet:
    """Build a :class:`VNet` (registry entry ``vnet``); 3D only."""
    return VNet(**kwargs)
