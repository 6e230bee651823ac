"""The Π-model (Laine & Aila, ICLR 2017), for segmentation.

"Temporal ensembling for semi-supervised learning", Section 2.1 and Algorithm 1.

- One network f is evaluated twice on every image of the batch (labelled and
  unlabelled), each evaluation with its own stochastic augmentation and its own dropout
  mask (f in training mode both times). Here each pass gets its own random affine
  transform and intensity perturbation (:meth:`Method.augment_batch`, the platform's
  augmentation ranges) — the paper used random translations, flips and Gaussian input
  noise.
- The two probability maps live on differently transformed grids: each is warped back
  onto the grid of the un-augmented images with the inverse of its own affine
  (:func:`semiseg.components.alignment.to_original_frame`), and they are compared only on
  the voxels that both passes saw inside the field of view.
- Supervised loss (``train.supervised_loss``) on the labelled part of the first pass, as
  the paper's Algorithm 1 (which evaluates the cross-entropy on z_i, the first pass).
- Consistency: the squared difference of the two softmax maps, **summed over classes and
  averaged over the valid voxels** (as :func:`semiseg.losses.consistency_loss` ``mse``
  does). The paper averages over the C classes as well (1/(C|B|) Σ‖z_i − z̃_i‖²), so
  its weight corresponds to ours times C.
- Weight w(t) = ``consistency`` × the configured ramp-up (``schedule.rampup_*``; the paper:
  the sigmoid exp(−5(1 − t)²) over 80 epochs), × the batch's labelled share
  n_l / (n_l + n_u) when ``scale_by_labelled_fraction``. The paper's w_max = 100 is
  multiplied by M/N (M labelled of N training images), but there it balances a
  supervised term divided by the whole batch size |B| (1/|B| Σ_{i∈B∩L}), which carries
  the same factor M/N in expectation: the ratio of consistency to supervised loss is
  w_max. The supervised loss here is averaged over the labelled images only, so that
  ratio needs no factor (default off), and the class sum turns the paper's w_max/C on
  CIFAR-10 (C = 10) into the default ``consistency`` = 100/10 = 10. Temporal ensembling
  (:mod:`semiseg.methods.temporal_ensembling`) follows the same reading: 30/10 = 3. The
  search range, 0.3–100 (log), reaches the mean teacher's scale (1.0) and ten times the
  paper's equivalent; a voxel-wise map is mostly easy background, so the weight that
  suits a segmentation task may be far from CIFAR-10's.
- ``stop_gradient`` (default off, as in the paper, which back-propagates through both
  evaluations): when on, the second pass runs under ``no_grad`` and is only a target.
  Without it both passes run as one forward of the concatenated views (one
  ``DistributedDataParallel`` forward per backward; BatchNorm statistics are then those
  of both views together); with it the two passes are separate forwards.

Which network each loss trains: both losses train the single network ``student`` (the
one evaluated); the consistency trains it through both passes, or through the first one
only with ``stop_gradient``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from semiseg.components.alignment import to_original_frame
from semiseg.config import NON_NEGATIVE
from semiseg.losses import supervised_loss
from semiseg.methods.base import BuildContext, Method, MethodParams, Progress, StepOutput, hparam
from semiseg.methods.registry import register_method


@dataclass(frozen=True)
class PiModelParams(MethodParams):
    """Hyperparameters of the Π-model (defaults and ranges: see the module docstring)."""

    consistency: float = hparam(10.0, low=0.3, high=100.0, log=True, bounds=NON_NEGATIVE,
                                help="weight of the class-summed MSE consistency after ramp-up (paper: w_max 100 on "
                                     "a mean over CIFAR-10's 10 classes, i.e. 10 here)")
    scale_by_labelled_fraction: bool = hparam(False, choices=(False, True),
                                              help="multiply the weight by the batch's labelled share "
                                                   "n_l/(n_l + n_u) (paper: by M/N over the dataset)")
    stop_gradient: bool = hparam(False, choices=(False, True),
                                 help="treat the second pass as a fixed target (paper: gradients through both)")


def labelled_fraction(batch: Mapping[str, torch.Tensor]) -> float:
    """The batch's labelled share n_l / (n_l + n_u) (1 when it has no ``image_u``)."""
    n_l = batch["image_l"].shape[0]
    n_u = batch["image_u"].shape[0] if "image_u" in batch else 0
    return n_l / (n_l + n_u)


def aligned_squared_error(probs_a: torch.Tensor, probs_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared difference of two aligned probability maps, summed over classes, averaged over ``mask``.

    Args:
        probs_a, probs_b: ``[B, C, *spatial]`` probabilities on the same grid; both keep
            their gradients (detach one to make it a target).
        mask: ``[B, 1, *spatial]`` 1 on the voxels to compare.

    Returns:
        ``Σ_v m_v Σ_c (a_cv − b_cv)² / max(Σ_v m_v, 1)`` (the paper would further divide by C).
    """
    per_voxel = ((probs_a.float() - probs_b.float()) ** 2).sum(dim=1)
    weights = mask.squeeze(1).to(per_voxel.dtype)
    return (per_voxel * weights).sum() / weights.sum().clamp_min(1.0)


@register_method
class PiModel(Method):
    """One network trained on labels and on agreeing with itself across two stochastic passes."""

    name = "pi_model"
    Params = PiModelParams
    params: PiModelParams

    def __init__(self, context: BuildContext, params: PiModelParams) -> None:
        super().__init__(context, params)
        self.trained["student"] = context.build_network()

    def training_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """Supervised loss on the first pass's labelled part, ramped consistency between the aligned passes."""
        first, second = self.augment_batch(batch), self.augment_batch(batch)
        student = self.trained["student"]
        if self.params.stop_gradient:
            logits_first = student(first.images)
            with torch.no_grad():
                logits_second = student(second.images)
        else:
            logits_first, logits_second = student(torch.cat([first.images, second.images])).split(
                first.images.shape[0])
        loss_sup = supervised_loss(self.context.supervised_loss, logits_first[:first.n_l], first.labels)
        probs_first, mask_first = to_original_frame(logits_first.float().softmax(dim=1), first.theta)
        probs_second, mask_second = to_original_frame(logits_second.float().softmax(dim=1), second.theta)
        loss_cons = aligned_squared_error(probs_first, probs_second, mask_first * mask_second)
        weight = self.cons_weight(progress, self.params.consistency)
        if self.params.scale_by_labelled_fraction:
            weight *= labelled_fraction(batch)
        return StepOutput(objectives={"main": loss_sup + weight * loss_cons},
                          logs={"loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach(),
                                "cons_weight": weight},
                          unsupervised=loss_cons)
