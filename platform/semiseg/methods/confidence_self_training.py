"""Adversarial confidence maps and self-training (Hung et al., BMVC 2018).

"Adversarial learning for semi-supervised semantic segmentation" (Hung, Tsai, Liou, Lin &
Yang, BMVC 2018; reference code ``hfslyc/AdvSemiSeg``). A fully-convolutional discriminator
D (:class:`semiseg.components.discriminator.PixelDiscriminator`, the paper's 4×4 stride-2
LeakyReLU network; paper widths 64-128-256-512-1, here ``disc_width`` · 2^level with a
smaller CPU-friendly default) reads class-probability maps only — the softmax of the
segmenter, or one-hot ground truth, C channels, not the image, as in the paper — and its
logits are upsampled to the input size (bilinear / trilinear, aligned corners, as in the
reference code): ``sigmoid(D(p))`` is a per-pixel confidence map, the probability that a
pixel's prediction is ground truth. Both networks see the augmented batch (affine +
intensity).

- ``discriminator`` objective (Eq. 1): per-pixel BCE with one-hot labels of the labelled
  images → 1 and the *detached* softmax of every image of the batch (labelled and
  unlabelled, the reference code's ``D_remain``) → 0, ``½·BCE(D(onehot), 1) + ½·BCE(D(p), 0)``;
  it trains D only, with its own learning rate ``disc_lr`` (paper: 1e-4, returned by
  :meth:`group_learning_rates`; it follows the run's schedule).
- ``main`` objective (Eq. 3): ``L_sup + w_adv·L_adv,l + w_adv,u·L_adv,u + w_semi·L_semi`` where

  * ``L_sup`` is the configured supervised loss on the labelled images (the paper: CE);
  * ``L_adv = BCE(D(p), 1)`` per pixel (Eq. 4), applied to every image's prediction: on
    labelled images with ``adversarial_weight`` (λ_adv = 0.01, the paper's Table 5 and the
    reference README), on unlabelled ones with ``adversarial_weight_unlabelled`` (0.001, the
    reference code's ``LAMBDA_SEMI_ADV``);
  * ``L_semi`` (Eq. 5) is the cross-entropy of the unlabelled predictions against their own
    argmax on the pixels whose confidence ``sigmoid(D(p_u))`` is above ``confidence_threshold``
    (T_semi = 0.2; the paper's indicator ``I(M > T_semi)``; the reference code keeps ``≥ T``,
    which differs only on a measure-zero set), averaged over those pixels (0 when there are
    none); mask and pseudo-labels carry no gradient. Weight ``semi_weight`` (λ_semi = 0.1).
    It is switched on once the semi-supervised stage has run ``semi_start_epoch`` epochs
    (``progress.stage_epoch``): the paper starts it after 5000 of 20000 iterations, a quarter of
    training, i.e. 7.5 of the platform's default 30 epochs — D must first learn to tell
    predictions from labels before its confidence means anything.

  Every weight is its λ times the configured ramp-up (as in :mod:`semiseg.methods.adversarial`;
  the paper has none: configure ``rampup_shape = none`` to reproduce it). The adversarial
  terms' gradients flow *through* D, but the loop back-propagates each objective into its
  own optimiser group, so ``main`` trains the segmenter only.

``unsupervised`` in the step output is ``L_adv,u + L_semi`` (``L_semi`` only once switched on),
unweighted: both terms are computed on unlabelled images, so before ``semi_start_epoch`` the
adversarial term alone is the method's unsupervised signal. Logs: ``loss_sup``, ``loss_adv``
(labelled), ``loss_adv_u``, ``loss_semi`` (0 before the switch-on), ``loss_cons`` (the unsupervised
term), ``loss_disc``, ``semi_ratio`` (share of confident unlabelled pixels), ``adv_weight``,
``adv_weight_u`` and ``cons_weight`` (the self-training weight, 0 before the switch-on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from semiseg.components.discriminator import constant_target_bce
from semiseg.config import NON_NEGATIVE, PROBABILITY
from semiseg.losses import one_hot, supervised_loss
from semiseg.methods.base import BuildContext, Progress, StepOutput, hparam
from semiseg.methods.discriminator_base import PixelDiscriminatorMethod, PixelDiscriminatorParams
from semiseg.methods.registry import register_method

GROUND_TRUTH_LABEL = 1.0
"""The discriminator's label of one-hot ground truth (Hung et al.'s ``gt_label``)."""
PREDICTION_LABEL = 0.0
"""The discriminator's label of the segmenter's predictions (Hung et al.'s ``pred_label``)."""


@dataclass(frozen=True)
class ConfidenceSelfTrainingParams(PixelDiscriminatorParams):
    """Hyperparameters of Hung et al.'s method (defaults: the paper's Table 5 / reference code)."""

    adversarial_weight: float = hparam(0.01, low=1e-4, high=0.1, log=True, bounds=NON_NEGATIVE,
                                       help="λ_adv of the adversarial term on labelled predictions after "
                                            "ramp-up (paper: 0.01)")
    adversarial_weight_unlabelled: float = hparam(0.001, low=1e-4, high=0.1, log=True, bounds=NON_NEGATIVE,
                                                  help="λ_adv of the adversarial term on unlabelled predictions "
                                                       "after ramp-up (reference code: 0.001)")
    semi_weight: float = hparam(0.1, low=0.01, high=1.0, log=True, bounds=NON_NEGATIVE,
                                help="λ_semi of the self-training term on confident unlabelled pixels after "
                                     "ramp-up (paper: 0.1)")
    confidence_threshold: float = hparam(0.2, low=0.05, high=0.5, bounds=PROBABILITY,
                                         help="T_semi: discriminator confidence above which an unlabelled "
                                              "pixel's argmax becomes a pseudo-label (paper: 0.2)")
    semi_start_epoch: float = hparam(7.5, low=0.0, high=15.0, bounds=NON_NEGATIVE,
                                     help="semi-supervised-stage epoch from which the self-training term is "
                                          "on (paper: 5000 of 20000 iterations, a quarter of training)")


def confidence_mask(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels whose discriminator confidence is strictly above ``threshold`` (Hung et al.'s Eq. 5).

    Args:
        confidence: ``sigmoid`` of the discriminator's logits, any shape.
        threshold: T_semi.

    Returns:
        Boolean mask of ``confidence``'s shape, detached.
    """
    return confidence.detach() > threshold


def masked_self_training_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` against their own argmax, averaged over the pixels of ``mask``.

    Args:
        logits: ``[B, C, *spatial]`` segmenter logits (unlabelled images).
        mask: ``[B, *spatial]`` boolean mask of the pixels used.

    Returns:
        Scalar float32 loss; 0 (still attached to ``logits``) when ``mask`` is empty.
    """
    logits = logits.float()
    pseudo_labels = logits.detach().argmax(dim=1)
    per_pixel = F.cross_entropy(logits, pseudo_labels, reduction="none")
    weights = mask.to(per_pixel.dtype)
    return (per_pixel * weights).sum() / weights.sum().clamp_min(1.0)


@register_method
class ConfidenceSelfTraining(PixelDiscriminatorMethod):
    """Segmenter trained on labels, to fool a per-pixel discriminator, and on its confident pixels."""

    name = "confidence_self_training"
    Params = ConfidenceSelfTrainingParams
    params: ConfidenceSelfTrainingParams

    def __init__(self, context: BuildContext, params: ConfidenceSelfTrainingParams) -> None:
        super().__init__(context, params)
        self.build_discriminator()

    def semi_active(self, progress: Progress) -> bool:
        """Whether the self-training term is on: ``semi_start_epoch`` epochs of the semi-supervised stage done."""
        return progress.stage_epoch >= self.params.semi_start_epoch

    def training_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """Supervised + adversarial (+ self-training once on) loss for the segmenter; BCE for D."""
        augmented = self.augment_batch(batch)
        n_l, labels = augmented.n_l, augmented.labels
        logits = self.trained["student"](augmented.images)
        loss_sup = supervised_loss(self.context.supervised_loss, logits[:n_l], labels)
        probs = logits.float().softmax(dim=1)
        spatial = tuple(probs.shape[2:])
        discriminator = self.trained["discriminator"]
        scores = discriminator(probs, output_size=spatial)
        loss_adv = constant_target_bce(scores[:n_l], GROUND_TRUTH_LABEL)
        ground_truth = one_hot(labels, self.context.num_classes)
        loss_disc = 0.5 * (constant_target_bce(discriminator(ground_truth, output_size=spatial), GROUND_TRUTH_LABEL)
                           + constant_target_bce(discriminator(probs.detach(), output_size=spatial),
                                                 PREDICTION_LABEL))
        adv_weight = self.cons_weight(progress, self.params.adversarial_weight)
        main = loss_sup + adv_weight * loss_adv
        logs = {"loss_sup": loss_sup.detach(), "loss_adv": loss_adv.detach(), "loss_disc": loss_disc.detach(),
                "adv_weight": adv_weight}
        if n_l == logits.shape[0]:
            return StepOutput(objectives={"main": main, "discriminator": loss_disc}, logs=logs)
        loss_adv_u = constant_target_bce(scores[n_l:], GROUND_TRUTH_LABEL)
        adv_weight_u = self.cons_weight(progress, self.params.adversarial_weight_unlabelled)
        mask = confidence_mask(torch.sigmoid(scores[n_l:, 0]), self.params.confidence_threshold)
        unsupervised = loss_adv_u
        semi_weight = 0.0
        loss_semi = torch.zeros((), device=logits.device)
        if self.semi_active(progress):
            loss_semi = masked_self_training_loss(logits[n_l:], mask)
            semi_weight = self.cons_weight(progress, self.params.semi_weight)
            unsupervised = unsupervised + loss_semi
        main = main + adv_weight_u * loss_adv_u + semi_weight * loss_semi
        logs.update(loss_adv_u=loss_adv_u.detach(), loss_semi=loss_semi.detach(),
                    loss_cons=unsupervised.detach(), semi_ratio=mask.float().mean(),
                    adv_weight_u=adv_weight_u, cons_weight=semi_weight)
        return StepOutput(objectives={"main": main, "discriminator": loss_disc}, logs=logs,
                          unsupervised=unsupervised)
