"""Uncertainty-aware mean teacher, UA-MT (Yu et al., MICCAI 2019).

"Uncertainty-aware self-ensembling model for semi-supervised 3D left atrium
segmentation"; defaults from the authors' reference code (UA-MT, SSL4MIS) as listed in
``shared/papers/README.md`` and ``la-mri-cps-uamt-lovasz.md``.

- The teacher is the exponential moving average of the student
  (:mod:`semiseg.components.ema`), decay ``ema_decay`` with the warm-up
  α = min(1 − 1/(step + 1), α).
- Default decay 0.95 instead of the reference code's 0.99 (over 6000 iterations): the
  default schedules here run 400–600 steps; see :mod:`semiseg.methods.mean_teacher`.
- The student and the teacher see the same augmented batch (shared affine and
  intensity augmentation); the teacher's input gets extra noise clamp(N(0, 0.1), ±0.2).
  Its (eval-mode) output is the consistency target.
- Uncertainty: ``mc_passes`` further teacher passes with dropout active (BatchNorm
  stays in eval) and fresh input noise; the predictive entropy u of their mean
  softmax (:mod:`semiseg.components.uncertainty`).
- Voxels with u ≥ H are masked out of the squared-error consistency, with the
  threshold H = (0.75 + 0.25·w(t))·ln C, w the sigmoid ramp-up over the configured
  ``schedule.rampup_epochs`` of the semi-supervised stage (the reference code ramps
  both the weight and the threshold over the whole schedule: set the ramp-up to the
  stage's length to match; without a ramp-up H = ln C from the start); the loss is
  normalised by C·Σ mask (the reference code's ln 2 and 2 are the C = 2 case).
- Supervised loss (Dice + CE by default) on the labelled part; consistency on the
  unlabelled part (reference code) or on all images, weighted by ``consistency`` times
  the configured ramp-up.

Which network each loss trains: both losses train the student; the teacher gets no
gradient (every teacher pass runs under ``no_grad``) and changes only by the EMA in
``after_step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from semiseg.components.uncertainty import (certainty_mask, clamped_noise, masked_consistency, mc_teacher_probs,
                                            predictive_entropy, uncertainty_threshold)
from semiseg.config import NON_NEGATIVE, UNIT_OPEN, Bounds
from semiseg.losses import supervised_loss
from semiseg.methods.base import Progress, StepOutput, hparam
from semiseg.methods.ema_teacher_base import EmaTeacherMethod, EmaTeacherParams
from semiseg.methods.registry import register_method
from semiseg.schedules import rampup

CONSISTENCY_TARGETS = ("unlabelled", "all")


@dataclass(frozen=True)
class UaMeanTeacherParams(EmaTeacherParams):
    """Hyperparameters of the uncertainty-aware mean teacher (defaults: the reference code)."""

    ema_decay: float = hparam(0.95, low=0.9, high=0.9999, complement=True, bounds=UNIT_OPEN,
                              help="EMA decay α of the teacher (reference code: 0.99 over 10^4+ steps; 0.95 for "
                                   "short schedules, see the module docstring)")
    consistency: float = hparam(0.1, low=0.01, high=10.0, log=True, bounds=NON_NEGATIVE,
                                help="weight of the uncertainty-masked consistency after ramp-up (reference code: "
                                     "0.1)")
    mc_passes: int = hparam(8, low=2, high=16, bounds=Bounds(2.0),
                            help="stochastic teacher passes T for the uncertainty (paper: 8)")
    teacher_noise_std: float = hparam(0.1, bounds=NON_NEGATIVE,
                                      help="σ of the teacher's input noise (reference code: 0.1)")
    teacher_noise_clip: float = hparam(0.2, bounds=NON_NEGATIVE,
                                       help="bound of the teacher's input noise (reference code: 0.2)")
    cons_on: str = hparam("unlabelled", choices=CONSISTENCY_TARGETS,
                          help="images the consistency covers (reference code: unlabelled)")


@register_method
class UaMeanTeacher(EmaTeacherMethod):
    """Mean teacher whose consistency is restricted to voxels the teacher is certain about.

    The teacher's decay is ``ema_decay`` throughout (with the warm-up cap).
    """

    name = "ua_mean_teacher"
    Params = UaMeanTeacherParams
    params: UaMeanTeacherParams

    def training_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """Supervised loss on the labelled part, uncertainty-masked consistency with the teacher."""
        augmented = self.augment_batch(batch)
        images, n_l = augmented.images, augmented.n_l
        student_logits = self.trained["student"](images)
        loss_sup = supervised_loss(self.context.supervised_loss, student_logits[:n_l], augmented.labels)
        start = n_l if self.params.cons_on == "unlabelled" else 0
        threshold = uncertainty_threshold(self._threshold_ramp(progress), self.context.num_classes)
        loss_cons, certain = self._consistency(student_logits[start:], images[start:], threshold)
        weight = self.cons_weight(progress, self.params.consistency)
        return StepOutput(objectives={"main": loss_sup + weight * loss_cons},
                          logs={"loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach(),
                                "cons_weight": weight, "uncertainty_threshold": threshold,
                                "certain_fraction": certain},
                          unsupervised=loss_cons)

    def _consistency(self, student_logits: torch.Tensor, images: torch.Tensor,
                     threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked consistency of the student against the noisy teacher, and the certain fraction."""
        if images.shape[0] == 0:
            zero = student_logits.float().sum() * 0.0
            return zero, zero.detach()
        teacher = self.frozen["teacher"]
        std, clip = self.params.teacher_noise_std, self.params.teacher_noise_clip
        with torch.no_grad():
            noise = clamped_noise(images.shape, std, clip, self.generator).to(images.device, images.dtype)
            target = teacher(images + noise).float().softmax(dim=1)
            mean_probs = mc_teacher_probs(teacher, images, self.params.mc_passes, std, clip,
                                          self.generator)
            mask = certainty_mask(predictive_entropy(mean_probs), threshold)
        loss = masked_consistency(student_logits.float().softmax(dim=1), target, mask)
        return loss, mask.mean()

    def _threshold_ramp(self, progress: Progress) -> float:
        """Sigmoid ramp-up w(t) over the configured ramp-up epochs of the semi-supervised stage."""
        return rampup(progress.stage_epoch, self.context.rampup_epochs, "sigmoid")
