"""Fully-convolutional discriminators and the adversarial losses (2D and 3D).

:class:`Discriminator` (Zhang et al.) scores a whole segmentation; :class:`PixelDiscriminator`
(ADVENT, Hung et al.) returns a map of logits, one per output location.

The discriminator (Zhang et al.'s "evaluation network", MICCAI 2017) looks at an image
together with a segmentation's class probabilities, ``concat(image, softmax)``, and
returns one logit per sample: stride-2 convolutions with LeakyReLU, a 1×1 convolution
to one channel and a global average. It has no normalisation layers, so real and fake
batches never share batch statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Discriminator(nn.Module):
    """Fully-convolutional image-and-segmentation discriminator.

    Args:
        dims: 2 or 3.
        in_channels: image channels.
        num_classes: channels of the probability map.
        width: channels of the first convolution (doubled at each further level).
        depth: number of stride-2 convolutions.

    Raises:
        ValueError: ``dims`` not 2 or 3, or ``depth`` < 1.
    """

    def __init__(self, *, dims: int, in_channels: int, num_classes: int, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        layers: list[nn.Module] = []
        cin = in_channels + num_classes
        for level in range(depth):
            cout = width * 2 ** level
            layers += [conv(cin, cout, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            cin = cout
        layers.append(conv(cin, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Score ``images`` ``[B, C, *spatial]`` with probabilities ``[B, K, *spatial]``.

        Returns:
            ``[B]`` logits (high = "segmentation of a labelled image").
        """
        x = torch.cat([images, probs.to(images.dtype)], dim=1)
        return self.body(x).flatten(1).mean(dim=1)


def discriminator_loss(logits_labelled: torch.Tensor, logits_unlabelled: torch.Tensor) -> torch.Tensor:
    """BCE of the discriminator: labelled → 1 (real), unlabelled → 0 (fake).

    The mean of the two batch-averaged terms, so that the loss does not depend on the
    labelled/unlabelled proportion of the batch.

    Args:
        logits_labelled: ``[Bl]`` logits on segmentations of labelled images.
        logits_unlabelled: ``[Bu]`` logits on segmentations of unlabelled images.

    Returns:
        Scalar loss.
    """
    real = F.binary_cross_entropy_with_logits(logits_labelled.float(), torch.ones_like(logits_labelled.float()))
    fake = F.binary_cross_entropy_with_logits(logits_unlabelled.float(),
                                              torch.zeros_like(logits_unlabelled.float()))
    return 0.5 * (real + fake)


def fooling_loss(logits_unlabelled: torch.Tensor) -> torch.Tensor:
    """BCE of the segmenter's adversarial term: unlabelled segmentations scored as real (1).

    Args:
        logits_unlabelled: ``[Bu]`` discriminator logits on segmentations of unlabelled images.

    Returns:
        Scalar loss.
    """
    logits = logits_unlabelled.float()
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


class PixelDiscriminator(nn.Module):
    """Fully-convolutional discriminator of class-probability-like maps (ADVENT; Hung et al.).

    The discriminator of Vu et al. (ADVENT, CVPR 2019) and of Hung et al. (BMVC 2018,
    ``FCDiscriminator`` in their reference code): ``depth`` 4×4 convolutions of stride 2,
    ``width · 2^level`` channels, each followed by LeakyReLU(0.2), then a 4×4 stride-2
    convolution to one channel, no normalisation. The papers use ``width`` 64 and ``depth`` 4
    (channels 64, 128, 256, 512, 1). Before each convolution a spatial axis shorter than 2
    is zero-padded to 2, so tiny patches (e.g. 8×16×16) still give at least one output voxel;
    larger inputs run exactly the papers' network.

    Args:
        dims: 2 or 3.
        in_channels: channels of the input maps (number of classes).
        width: channels of the first convolution (doubled at each further level).
        depth: stride-2 convolutions with LeakyReLU before the final one-channel convolution.

    Raises:
        ValueError: ``dims`` not 2 or 3, ``depth`` < 1 or ``width`` < 1.
    """

    kernel_size = 4

    def __init__(self, *, dims: int, in_channels: int, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if depth < 1 or width < 1:
            raise ValueError(f"depth and width must be >= 1, got depth {depth}, width {width}")
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        channels = [in_channels] + [width * 2 ** level for level in range(depth)] + [1]
        self.dims = dims
        self.convs = nn.ModuleList(conv(cin, cout, self.kernel_size, stride=2, padding=1)
                                   for cin, cout in zip(channels[:-1], channels[1:]))

    def forward(self, maps: torch.Tensor, output_size: tuple[int, ...] | None = None) -> torch.Tensor:
        """Logits ``[B, 1, *spatial']`` of ``maps`` ``[B, K, *spatial]`` (high = the "1" class).

        Args:
            maps: input maps (probabilities, one-hot labels, self-information).
            output_size: when given, the logits are resized to it (bilinear / trilinear with
                aligned corners, as Hung et al. upsample their confidence map to the input size).
        """
        x = maps
        for index, conv in enumerate(self.convs):
            x = conv(_pad_to_at_least(x, 2, self.dims))
            if index < len(self.convs) - 1:
                x = F.leaky_relu(x, 0.2)
        if output_size is not None and tuple(x.shape[2:]) != tuple(output_size):
            mode = "bilinear" if self.dims == 2 else "trilinear"
            x = F.interpolate(x, size=tuple(output_size), mode=mode, align_corners=True)
        return x


def _pad_to_at_least(x: torch.Tensor, size: int, dims: int) -> torch.Tensor:
    """``x`` with each of its last ``dims`` axes zero-padded at the end to at least ``size``."""
    shortfall = [max(0, size - s) for s in x.shape[-dims:]]
    if not any(shortfall):
        return x
    padding: list[int] = []
    for missing in reversed(shortfall):
        padding += [0, missing]
    return F.pad(x, padding)


def constant_target_bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Mean binary cross-entropy of every logit against one label (ADVENT's ``bce_loss``).

    Args:
        logits: discriminator logits of any shape (per sample or per pixel).
        target: the label, 0 or 1.

    Returns:
        Scalar loss (float32), averaged over every element.
    """
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(target)))
