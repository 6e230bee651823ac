"""Global contrastive pretraining of the encoder (Chaitanya et al., NeurIPS 2020).

"Contrastive learning of global and local features for medical image segmentation with
limited annotations": the *global* loss only.

- Pretraining stage (the first ``pretrain_epochs`` epochs; the common hyperparameter
  defaults to 0, so it must be set > 0 for this method to differ from the supervised
  baseline): every image of the batch, labelled and unlabelled, is augmented twice
  independently (affine + intensity); the U-Net's encoder up to the bottleneck, global
  average pooling and a projection head g (``projection``) map both views to
  ``projection_dim`` vectors; the NT-Xent (SimCLR) loss with temperature
  ``temperature`` pulls the two views of an image together and pushes the other images
  of the batch away.
- Semi-supervised stage: the whole network is fine-tuned with Dice + CE on the
  augmented labelled images; the projection head is no longer used.

Which network each loss trains: the contrastive loss trains the encoder of ``student``
and the projection head (the decoder gets no gradient); the supervised loss trains the
whole ``student``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from semiseg.augment import augment_images, mixed_images
from semiseg.components.contrastive import ProjectionHead, nt_xent_loss, unet_bottleneck
from semiseg.config import AT_LEAST_ONE, POSITIVE
from semiseg.methods.base import (BuildContext, Method, MethodParams, Progress, StepOutput,
                                  augmented_supervised_loss, hparam)
from semiseg.methods.registry import register_method


@dataclass(frozen=True)
class ContrastivePretrainParams(MethodParams):
    """Hyperparameters of contrastive pretraining (the pretraining length is ``pretrain_epochs``)."""

    temperature: float = hparam(0.1, low=0.05, high=0.5, log=True, bounds=POSITIVE,
                                help="τ of the NT-Xent loss (paper: 0.1)")
    projection_dim: int = hparam(64, bounds=AT_LEAST_ONE, help="output dimension of the projection head g")


@register_method
class ContrastivePretrain(Method):
    """Encoder pretrained with the global NT-Xent loss, then supervised fine-tuning."""

    name = "contrastive_pretrain"
    Params = ContrastivePretrainParams
    params: ContrastivePretrainParams
    segmenters = ("student",)
    ddp_find_unused_parameters = True

    def __init__(self, context: BuildContext, params: ContrastivePretrainParams) -> None:
        super().__init__(context, params)
        student = context.build_network()
        self.trained["student"] = student
        channels = int(self.context.model["width"]) * 2 ** int(self.context.model["depth"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed * 1000 + 1)
            head = ProjectionHead(channels, params.projection_dim)
        self.trained["projection"] = head.to(context.device)

    def pretrain_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """NT-Xent between two augmented views of every image of the batch."""
        images = mixed_images(batch)
        views = torch.cat([self._augment(images), self._augment(images)])
        projections = self.trained["projection"](unet_bottleneck(self.trained["student"], views))
        z1, z2 = projections.chunk(2)
        loss = nt_xent_loss(z1, z2, self.params.temperature)
        return StepOutput(objectives={"main": loss}, logs={"loss_cons": loss.detach()}, unsupervised=loss)

    def training_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """Dice + CE on the augmented labelled images (fine-tuning of the whole network)."""
        loss = augmented_supervised_loss(self, self.trained["student"], batch["image_l"], batch["label_l"])
        return StepOutput(objectives={"main": loss}, logs={"loss_sup": loss.detach()})

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        """One random affine + intensity view of ``images``."""
        return augment_images(images, self.context.dims, self.context.augment, self.generator)[0]
