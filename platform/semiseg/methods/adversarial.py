"""Adversarial semi-supervised segmentation (Zhang et al., MICCAI 2017).

"Deep adversarial networks for biomedical image segmentation utilizing unannotated
images": a segmentation network (SN) and an evaluation network (EN, here
:class:`semiseg.components.discriminator.Discriminator`) that scores
``concat(image, softmax)``.

- Discriminator loss (``discriminator`` objective): BCE with segmentations of labelled
  images → 1 and of unlabelled images → 0, on *detached* segmenter outputs.
- Segmenter loss (``main`` objective): Dice + CE on the labelled images plus the
  adversarial term, BCE of the discriminator's score on unlabelled segmentations against
  1 ("look like the segmentation of an annotated image"), weighted by
  ``adversarial_weight`` times the configured ramp-up.
- Both networks see the same augmented batch (affine + intensity).

Which network each loss trains: the ``main`` objective trains the segmenter only (its
gradient flows *through* the discriminator, but the loop back-propagates each objective
into its own optimiser group: ``backward(inputs=segmenter params)``); the
``discriminator`` objective trains the discriminator only (segmenter outputs detached).
The discriminator has its own learning rate ``disc_lr`` (the reference code's 1e-4,
Adam-like optimisers) through :meth:`group_learning_rates`; the segmenter uses
``optim.lr``; both follow the run's schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from semiseg.components.discriminator import Discriminator, discriminator_loss, fooling_loss
from semiseg.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Bounds
from semiseg.losses import supervised_loss
from semiseg.methods.base import BuildContext, Method, MethodParams, Progress, StepOutput, hparam
from semiseg.methods.registry import register_method


@dataclass(frozen=True)
class AdversarialParams(MethodParams):
    """Hyperparameters of the adversarial method (the discriminator's size is not from the paper)."""

    adversarial_weight: float = hparam(0.1, low=0.001, high=1.0, log=True, bounds=NON_NEGATIVE,
                                       help="weight of the segmenter's adversarial term after ramp-up")
    disc_width: int = hparam(32, bounds=AT_LEAST_ONE,
                             help="channels of the discriminator's first convolution (not from the paper)")
    disc_depth: int = hparam(3, bounds=Bounds(1.0, 8.0),
                             help="stride-2 convolutions of the discriminator (not from the paper)")
    disc_lr: float = hparam(1e-4, low=1e-5, high=1e-3, log=True, bounds=POSITIVE,
                            help="learning rate of the discriminator's own optimiser (reference code: 1e-4)")


@register_method
class Adversarial(Method):
    """Segmenter trained on labels and to fool a discriminator on unlabelled images."""

    name = "adversarial"
    Params = AdversarialParams
    params: AdversarialParams

    def __init__(self, context: BuildContext, params: AdversarialParams) -> None:
        super().__init__(context, params)
        self.trained["student"] = context.build_network()
        self.trained["discriminator"] = context.build_module(
            lambda: Discriminator(dims=context.dims, in_channels=context.in_channels, num_classes=context.num_classes,
                                  width=params.disc_width, depth=params.disc_depth), seed_offset=1)

    def optimizer_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """``main``: the segmenter's parameters; ``discriminator``: the discriminator's."""
        return {"main": list(self.trained["student"].parameters()),
                "discriminator": list(self.trained["discriminator"].parameters())}

    def group_learning_rates(self) -> dict[str, float]:
        """The discriminator trains at ``disc_lr``."""
        return {"discriminator": self.params.disc_lr}

    def training_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """Supervised + ramped adversarial loss for the segmenter; BCE for the discriminator."""
        augmented = self.augment_batch(batch)
        inputs, n_l = augmented.images, augmented.n_l
        logits = self.trained["student"](inputs)
        loss_sup = supervised_loss(self.context.supervised_loss, logits[:n_l], augmented.labels)
        if n_l == inputs.shape[0]:
            return StepOutput(objectives={"main": loss_sup}, logs={"loss_sup": loss_sup.detach()})
        probs = logits.float().softmax(dim=1)
        discriminator = self.trained["discriminator"]
        loss_cons = fooling_loss(discriminator(inputs[n_l:], probs[n_l:]))
        detached = probs.detach()
        loss_disc = discriminator_loss(discriminator(inputs[:n_l], detached[:n_l]),
                                       discriminator(inputs[n_l:], detached[n_l:]))
        weight = self.cons_weight(progress, self.params.adversarial_weight)
        return StepOutput(objectives={"main": loss_sup + weight * loss_cons, "discriminator": loss_disc},
                          logs={"loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach(),
                                "loss_disc": loss_disc.detach(), "cons_weight": weight},
                          unsupervised=loss_cons)
