"""Stand-ins and hand formulas shared by the tests of the discriminator methods."""

from __future__ import annotations

import math

import torch
from torch import nn


def bce(logit: float, target: float) -> float:
    """Binary cross-entropy of one logit against one target, by hand."""
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def square_batch(spatial: tuple[int, ...], n_labelled: int, n_unlabelled: int) -> dict[str, torch.Tensor]:
    """Labelled images of a centred square (cube) of class 1 with noise, and noise as unlabelled images."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.zeros((n_labelled, *spatial), dtype=torch.long)
    labels[(slice(None), *(slice(s // 4, 3 * s // 4) for s in spatial))] = 1
    return {"image_l": labels[:, None].float() + 0.3 * torch.randn((n_labelled, 1, *spatial), generator=generator),
            "label_l": labels,
            "image_u": torch.randn((n_unlabelled, 1, *spatial), generator=generator)}


class FixedLogits(nn.Module):
    """A stand-in segmenter: ``scale`` times fixed logits (one map per image of the batch)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The first ``len(images)`` fixed maps, scaled."""
        return self.scale * self.logits[:images.shape[0]]
