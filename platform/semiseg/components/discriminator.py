"""A small fully-convolutional discriminator and the adversarial losses (2D and 3D).

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
