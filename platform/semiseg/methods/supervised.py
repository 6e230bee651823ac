"""Supervised baseline: the labelled cases only.

With few labelled cases it is the lower bound every semi-supervised method must beat;
with every case labelled (``data.num_labelled`` = all) it is the upper bound. The same
augmentation as the semi-supervised methods is applied to the labelled images and
their labels, so that a comparison measures the unlabelled data, not the augmentation.

Losses: Dice + cross-entropy on the labelled batch, training the one network.
"""

from __future__ import annotations

from typing import Mapping

import torch

from semiseg.methods.base import BuildContext, Method, MethodParams, Progress, StepOutput, augmented_supervised_loss
from semiseg.methods.registry import register_method


@register_method
class Supervised(Method):
    """Train one network on the labelled batch (no unlabelled data)."""

    name = "supervised"
    uses_unlabelled = False

    def __init__(self, context: BuildContext, params: MethodParams) -> None:
        super().__init__(context, params)
        self.trained["student"] = context.build_network()

    def training_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """Dice + CE on the augmented labelled images."""
        loss = augmented_supervised_loss(self, self.trained["student"], batch["image_l"], batch["label_l"])
        return StepOutput(objectives={"main": loss}, logs={"loss_sup": loss.detach()})
