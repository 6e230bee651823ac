"""Cross pseudo supervision, CPS (Chen et al., CVPR 2021).

"Semi-supervised semantic segmentation with cross pseudo supervision"; the adaptive
weight and the Lovász variant from the left-atrium report in
``shared/papers/la-mri-cps-uamt-lovasz.md`` (Eq. 4, Table 5).

- Two networks of the same architecture with different initialisations
  (``seed_offset`` 0 and 1) see the same augmented batch.
- Supervised loss (Dice + CE by default) on the labelled part, for each network (summed,
  Eq. 1).
- CPS term: each network is trained with cross-entropy on the other's hard
  pseudo-labels (argmax, no gradient), ℓ(p₁, y₂*) + ℓ(p₂, y₁*) (Eq. 2), on the
  unlabelled images or on all images (``cps_on``; the original uses both). With
  ``pseudo_loss = "lovasz"`` the Lovász-softmax loss of the pseudo-labels is added to
  each cross-entropy (Berman et al. 2018, :mod:`semiseg.components.lovasz`).
- Weight: ``consistency`` (1.5 for VOC in the paper, no ramp-up there) times the
  configured ramp-up; with ``adaptive_weight`` ("ALW", Eq. 4) also times the mean soft
  Dice of the supervised batches of the previous epoch (logged as ``dice_sup``, read in
  ``end_epoch``, kept in the resumable state). Until a first epoch has ended the
  current batch's Dice stands in for it.

Which network each loss trains: the supervised loss of a network trains that network;
ℓ(p₁, y₂*) trains net1 only and ℓ(p₂, y₁*) trains net2 only, since pseudo-labels are
detached. Validation uses net1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from semiseg.components.pseudo_labels import PSEUDO_LOSSES, cross_pseudo_supervision_loss
from semiseg.config import NON_NEGATIVE
from semiseg.losses import soft_dice_loss, supervised_loss
from semiseg.methods.base import BuildContext, Method, MethodParams, Progress, StepOutput, hparam
from semiseg.methods.registry import register_method

CPS_TARGETS = ("unlabelled", "all")


@dataclass(frozen=True)
class CrossPseudoSupervisionParams(MethodParams):
    """Hyperparameters of CPS (defaults: the paper's VOC setting)."""

    consistency: float = hparam(1.5, low=0.1, high=10.0, log=True, bounds=NON_NEGATIVE,
                                help="weight λ of the CPS term after ramp-up (paper: 1.5 VOC, 6 Cityscapes)")
    cps_on: str = hparam("all", choices=CPS_TARGETS,
                         help="images the CPS term covers (paper: labelled and unlabelled)")
    pseudo_loss: str = hparam("ce", choices=PSEUDO_LOSSES,
                              help="loss on pseudo-labels: ce, or lovasz (CE + Lovász-softmax)")
    adaptive_weight: bool = hparam(False, choices=(False, True),
                                   help="ALW: also weight the CPS term by the previous epoch's supervised Dice")


@register_method
class CrossPseudoSupervision(Method):
    """Two differently initialised networks supervising each other with hard pseudo-labels."""

    name = "cross_pseudo_supervision"
    segmenters = ("net1", "net2")
    Params = CrossPseudoSupervisionParams
    params: CrossPseudoSupervisionParams

    def __init__(self, context: BuildContext, params: CrossPseudoSupervisionParams) -> None:
        super().__init__(context, params)
        self.trained["net1"] = context.build_network(seed_offset=0)
        self.trained["net2"] = context.build_network(seed_offset=1)
        self.previous_dice: float | None = None

    def training_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """Supervised loss of both networks, weighted cross pseudo supervision."""
        context, augmented = self.context, self.augment_batch(batch)
        labels, n_l = augmented.labels, augmented.n_l
        logits1, logits2 = self.trained["net1"](augmented.images), self.trained["net2"](augmented.images)
        loss_sup = (supervised_loss(context.supervised_loss, logits1[:n_l], labels)
                    + supervised_loss(context.supervised_loss, logits2[:n_l], labels))
        with torch.no_grad():
            dice = 1.0 - 0.5 * (soft_dice_loss(logits1[:n_l], labels) + soft_dice_loss(logits2[:n_l], labels))
        start = n_l if self.params.cps_on == "unlabelled" else 0
        loss_cons = self._cps_loss(logits1[start:], logits2[start:])
        weight = self.cons_weight(progress, self.params.consistency) * self.adaptive_factor(dice)
        return StepOutput(objectives={"main": loss_sup + weight * loss_cons},
                          logs={"loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach(),
                                "cons_weight": weight, "dice_sup": dice},
                          unsupervised=loss_cons)

    def _cps_loss(self, logits1: torch.Tensor, logits2: torch.Tensor) -> torch.Tensor:
        """CPS term on the selected images; zero (attached to the graph) when there are none."""
        if logits1.shape[0] == 0:
            return (logits1.float().sum() + logits2.float().sum()) * 0.0
        return cross_pseudo_supervision_loss(logits1, logits2, self.params.pseudo_loss)

    def adaptive_factor(self, current_dice: torch.Tensor | float) -> float:
        """ALW factor: the previous epoch's mean supervised Dice, or 1 without ``adaptive_weight``.

        Args:
            current_dice: this batch's supervised Dice, used until a first epoch has ended.

        Returns:
            The factor multiplying the CPS weight.
        """
        if not self.params.adaptive_weight:
            return 1.0
        return self.previous_dice if self.previous_dice is not None else float(current_dice)

    def end_epoch(self, epoch: int, train_logs: Mapping[str, float]) -> None:
        """Keep the epoch's mean supervised Dice for the next epoch's ALW (pretraining epochs log none)."""
        if "dice_sup" in train_logs:
            self.previous_dice = float(train_logs["dice_sup"])

    def extra_state(self) -> dict[str, Any]:
        """The previous epoch's supervised Dice (ALW)."""
        return {"previous_dice": self.previous_dice}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`extra_state`."""
        self.previous_dice = state.get("previous_dice")

    def eval_model(self) -> torch.nn.Module:
        """net1."""
        return self.trained["net1"]
