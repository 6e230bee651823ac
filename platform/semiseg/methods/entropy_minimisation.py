"""Entropy minimisation (Grandvalet & Bengio, NeurIPS 2005) and its adversarial form (ADVENT).

"Semi-supervised learning by entropy minimization" (Grandvalet & Bengio 2005) and "ADVENT:
adversarial entropy minimization for domain adaptation in semantic segmentation" (Vu et
al., CVPR 2019; reference code ``valeoai/ADVENT``), with labelled images in the role of
ADVENT's source domain and unlabelled images in that of its target domain. Both variants
see the augmented batch (affine + intensity) and train the segmenter on its labelled part
with the configured supervised loss.

- ``adversarial = false`` (direct entropy minimisation, ADVENT's "MinEnt"): the ``main``
  objective is ``L_sup + w(t)·L_ent``, where ``L_ent`` is the mean over unlabelled pixels of
  the entropy ``−Σ_c p_c log p_c`` of the softmax, divided by ``log C`` as in ADVENT (so it
  lies in [0, 1]; :mod:`semiseg.components.entropy`), and ``w(t)`` is ``entropy_weight``
  (ADVENT's ``LAMBDA_ENT_MAIN`` 0.001) times the configured ramp-up. No discriminator is
  built, so every trained parameter is used by every step.
- ``adversarial = true`` (ADVENT's "AdvEnt"): a fully-convolutional discriminator D
  (:class:`semiseg.components.discriminator.PixelDiscriminator`: 4×4 stride-2 convolutions,
  LeakyReLU 0.2; the paper's widths 64-128-256-512-1, here ``disc_width`` · 2^level with a
  smaller CPU-friendly default) reads self-information maps ``I = −p·log p / log C`` (C
  channels) and outputs a map of logits. ADVENT's labels: source (labelled) = 0, target
  (unlabelled) = 1.

  * ``discriminator`` objective: ``½·BCE(D(I_l), 0) + ½·BCE(D(I_u), 1)`` on *detached*
    maps, averaged over D's output locations; it trains D only, with its own learning
    rate ``disc_lr`` (ADVENT's ``LEARNING_RATE_D`` 1e-4, returned by
    :meth:`group_learning_rates`; it follows the run's schedule).
  * ``main`` objective: ``L_sup + w(t)·BCE(D(I_u), 0)`` — the segmenter makes unlabelled
    maps look labelled; ``w(t)`` is ``adversarial_weight`` (ADVENT's ``LAMBDA_ADV_MAIN``
    0.001) times the configured ramp-up, as in :mod:`semiseg.methods.adversarial`.
    Its gradient flows *through* D, but the loop back-propagates each objective into its
    own optimiser group, so it trains the segmenter only.

ADVENT's multi-level (auxiliary decoder) terms are left out: the platform's segmenters have
one output. ``unsupervised`` in the step output is ``L_ent`` (direct) or the adversarial
term ``BCE(D(I_u), 0)`` (adversarial), unweighted. Logs: ``loss_sup``, ``loss_ent`` (also recorded
in the adversarial form, where it is not optimised), ``loss_cons`` (the unsupervised term),
``cons_weight`` (its ramped weight) and, adversarial, ``loss_adv`` and ``loss_disc``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from semiseg.components.discriminator import constant_target_bce
from semiseg.components.entropy import mean_entropy, self_information
from semiseg.config import NON_NEGATIVE
from semiseg.losses import supervised_loss
from semiseg.methods.base import BuildContext, Progress, StepOutput, hparam
from semiseg.methods.discriminator_base import PixelDiscriminatorMethod, PixelDiscriminatorParams
from semiseg.methods.registry import register_method

SOURCE_LABEL = 0.0
"""ADVENT's discriminator label of source (here: labelled) images."""
TARGET_LABEL = 1.0
"""ADVENT's discriminator label of target (here: unlabelled) images."""


@dataclass(frozen=True)
class EntropyMinimisationParams(PixelDiscriminatorParams):
    """Hyperparameters of entropy minimisation (defaults: ADVENT's reference configuration); the
    discriminator's (``disc_*``) are used only with ``adversarial``."""

    entropy_weight: float = hparam(0.001, low=1e-4, high=1.0, log=True, bounds=NON_NEGATIVE,
                                   help="weight of the normalised entropy of unlabelled predictions after "
                                        "ramp-up (ADVENT MinEnt: 0.001)")
    adversarial: bool = hparam(False, choices=(False, True),
                               help="ADVENT's adversarial form: a discriminator on self-information maps "
                                    "instead of the entropy term")
    adversarial_weight: float = hparam(0.001, low=1e-4, high=0.1, log=True, bounds=NON_NEGATIVE,
                                       help="weight of the segmenter's adversarial term after ramp-up "
                                            "(ADVENT: 0.001); only with adversarial")


@register_method
class EntropyMinimisation(PixelDiscriminatorMethod):
    """Segmenter trained on labels and to make confident (low-entropy) unlabelled predictions."""

    name = "entropy_minimisation"
    Params = EntropyMinimisationParams
    params: EntropyMinimisationParams

    def __init__(self, context: BuildContext, params: EntropyMinimisationParams) -> None:
        super().__init__(context, params)
        if params.adversarial:
            self.build_discriminator()

    def training_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """Supervised loss plus the ramped entropy term, or ADVENT's adversarial objectives."""
        augmented = self.augment_batch(batch)
        n_l = augmented.n_l
        logits = self.trained["student"](augmented.images)
        loss_sup = supervised_loss(self.context.supervised_loss, logits[:n_l], augmented.labels)
        if n_l == logits.shape[0]:
            return StepOutput(objectives={"main": loss_sup}, logs={"loss_sup": loss_sup.detach()})
        loss_ent = mean_entropy(logits[n_l:])
        logs = {"loss_sup": loss_sup.detach(), "loss_ent": loss_ent.detach()}
        if not self.params.adversarial:
            weight = self.cons_weight(progress, self.params.entropy_weight)
            logs.update(loss_cons=loss_ent.detach(), cons_weight=weight)
            return StepOutput(objectives={"main": loss_sup + weight * loss_ent}, logs=logs, unsupervised=loss_ent)
        information = self_information(logits)
        discriminator = self.trained["discriminator"]
        loss_adv = constant_target_bce(discriminator(information[n_l:]), SOURCE_LABEL)
        detached = information.detach()
        loss_disc = 0.5 * (constant_target_bce(discriminator(detached[:n_l]), SOURCE_LABEL)
                           + constant_target_bce(discriminator(detached[n_l:]), TARGET_LABEL))
        weight = self.cons_weight(progress, self.params.adversarial_weight)
        logs.update(loss_adv=loss_adv.detach(), loss_cons=loss_adv.detach(), loss_disc=loss_disc.detach(),
                    cons_weight=weight)
        return StepOutput(objectives={"main": loss_sup + weight * loss_adv, "discriminator": loss_disc},
                          logs=logs, unsupervised=loss_adv)
