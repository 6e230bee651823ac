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

from semiseg.augment import perturb_intensity, sample_affine, warp, warp_labels
from semiseg.losses import supervised_loss
from semiseg.methods.base import BuildContext, Method, MethodParams, Progress, StepOutput
from semiseg.methods.registry import register_method


def augmented_supervised_loss(method: Method, network: torch.nn.Module, images: torch.Tensor,
                              labels: torch.Tensor) -> torch.Tensor:
    """Supervised loss of ``network`` on spatially and intensity-augmented labelled images.

    Shared by methods whose supervised term is the plain one.
    """
    context = method.context
    theta = sample_affine(images.shape[0], context.dims, context.augment, method.generator, images.device,
                          shape=images.shape[2:])
    warped = perturb_intensity(warp(images, theta), context.augment, method.generator)
    return supervised_loss(context.supervised_loss, network(warped), warp_labels(labels, theta))


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
