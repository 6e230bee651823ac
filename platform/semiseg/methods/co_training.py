"""Uncertainty-aware multi-view co-training, UMCT (Xia et al., WACV 2020 / Medical Image Analysis 2020).

"3D semi-supervised learning with uncertainty-aware multi-view co-training" (WACV 2020)
and "Uncertainty-aware multi-view co-training for semi-supervised medical image
segmentation and domain adaptation" (MedIA 2020); the lecture's "multi-view co-training"
(``shared/papers/desrosiers-ssl-segmentation-lecture.md``).

- K = ``views`` segmenters (the paper: 3), each its own network initialised from its own
  seed (``seed_offset`` k), stored as ``view0`` … ``view{K-1}``. Every segmenter is in
  ``segmenters``, set per instance since K is a hyperparameter.
- Network k sees view k of the (shared) augmented batch: a re-orientation of the spatial
  axes (:mod:`semiseg.components.views`): in 3D the axis permutations, the first three
  cyclic so that each axis is the network's first once (the paper's three orthogonal
  views); in 2D identity, transpose, rot90, rot270, rot180, anti-transpose. Its logits
  are mapped back to the image's orientation by the exact inverse before any loss.
- Supervised loss (``train.supervised_loss``) of every view on the labelled part.
- Co-training term on the unlabelled part: each view j gives its MC-dropout mean
  p_j = (1/T) Σ_t softmax(f_j^t) over T = ``mc_passes`` passes (eval-mode BatchNorm,
  dropout active, no gradient) and its uncertainty u_j = −Σ_c p_jc log p_jc (predictive
  entropy). The target of view k is the uncertainty-weighted label fusion of the *other*
  views, per voxel: ŷ_k = argmax_c Σ_{j≠k} w_j p_jc / Σ_{j≠k} w_j with w_j = 1/(u_j + ε),
  ε = 1e-6 (the paper's reciprocal-uncertainty confidence, applied voxel-wise); view k
  learns it with cross-entropy. A network without dropout gives T identical passes: u is
  then the entropy of its plain prediction.
- Weights: the objective is the mean over views of (supervised + w(t)·co-training), w(t)
  = ``consistency`` times the configured ramp-up. The paper sums over views; with the
  default AdamW the factor K makes no difference, and the mean keeps the logged losses on
  the scale of a single network's.

Which network each loss trains: the supervised term and the co-training term of view k
train network k only (its targets come from the other views under ``no_grad``). Validation
uses :class:`~semiseg.components.views.ViewEnsemble`, the mean of the views' softmax.

Randomness: the augmentation draws from the method's generator (identical on every DDP
rank); dropout draws from the global torch RNG, which differs per rank, so the ranks'
targets differ slightly while DDP averages their gradients into identical weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from semiseg.components.parallel import unwrapped
from semiseg.components.pseudo_labels import hard_pseudo_labels, pseudo_label_loss
from semiseg.components.uncertainty import predictive_entropy
from semiseg.components.views import MAX_VIEWS, ViewEnsemble, from_view, fuse_other_views, mc_dropout_probs, to_view
from semiseg.config import NON_NEGATIVE, Bounds
from semiseg.losses import supervised_loss
from semiseg.methods.base import BuildContext, Method, MethodParams, Progress, StepOutput, hparam
from semiseg.models.evaluation import ENSEMBLE_VIEWS
from semiseg.methods.registry import register_method


@dataclass(frozen=True)
class CoTrainingParams(MethodParams):
    """Hyperparameters of multi-view co-training (defaults: see the module docstring)."""

    views: int = hparam(3, low=2, high=4, bounds=Bounds(2.0, float(MAX_VIEWS)),
                        help="number of views K, one network each (paper: 3; at most 6)")
    consistency: float = hparam(1.0, low=0.1, high=10.0, log=True, bounds=NON_NEGATIVE,
                                help="weight of the co-training cross-entropy after ramp-up")
    mc_passes: int = hparam(8, low=2, high=16, bounds=Bounds(1.0),
                            help="MC-dropout passes T per view for the fusion's uncertainty (as UA-MT: 8)")


@register_method
class CoTraining(Method):
    """K networks on K views of the image, each taught by the others' uncertainty-weighted labels."""

    name = "co_training"
    Params = CoTrainingParams
    params: CoTrainingParams

    def __init__(self, context: BuildContext, params: CoTrainingParams) -> None:
        super().__init__(context, params)
        self.segmenters = tuple(f"view{k}" for k in range(params.views))
        for k, key in enumerate(self.segmenters):
            self.trained[key] = context.build_network(seed_offset=k)
        self._ensemble = ViewEnsemble([self.trained[key] for key in self.segmenters], context.dims)

    def training_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """Supervised loss of every view, ramped co-training cross-entropy on the unlabelled part."""
        augmented = self.augment_batch(batch)
        images, n_l, dims = augmented.images, augmented.n_l, self.context.dims
        logits = [from_view(self.trained[key](to_view(images, k, dims)), k, dims)
                  for k, key in enumerate(self.segmenters)]
        losses_sup = [supervised_loss(self.context.supervised_loss, view_logits[:n_l], augmented.labels)
                      for view_logits in logits]
        loss_sup = torch.stack(losses_sup).mean()
        loss_cons = self.co_training_loss([view_logits[n_l:] for view_logits in logits], images[n_l:])
        weight = self.cons_weight(progress, self.params.consistency)
        return StepOutput(objectives={"main": loss_sup + weight * loss_cons},
                          logs={"loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach(),
                                "cons_weight": weight},
                          unsupervised=loss_cons)

    def co_training_loss(self, logits: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Mean over views k of CE(logits_k, argmax of the other views' uncertainty-weighted fusion).

        Args:
            logits: per view, ``[U, C, *spatial]`` logits in the image's orientation.
            images: ``[U, C_in, *spatial]`` the (augmented) images they were computed on.

        Returns:
            Scalar; zero, attached to every view's graph, when there are no images.
        """
        if images.shape[0] == 0:
            return sum(view_logits.float().sum() for view_logits in logits) * 0.0
        targets = self.fused_targets(images)
        return torch.stack([pseudo_label_loss(view_logits, target, "ce")
                            for view_logits, target in zip(logits, targets)]).mean()

    @torch.no_grad()
    def fused_targets(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Hard pseudo-label of each view: argmax of the other views' uncertainty-weighted MC-dropout mean.

        Args:
            images: ``[U, C_in, *spatial]`` in the image's orientation.

        Returns:
            Per view, ``[U, *spatial]`` int64 labels (no gradient).
        """
        dims, passes = self.context.dims, self.params.mc_passes
        probs = [mc_dropout_probs(unwrapped(self.trained[key]), images, k, dims, passes)
                 for k, key in enumerate(self.segmenters)]
        uncertainties = [predictive_entropy(p) for p in probs]
        return [hard_pseudo_labels(fuse_other_views(probs, uncertainties, k)) for k in range(len(probs))]

    def eval_model_spec(self) -> dict[str, Any]:
        """The evaluation network is the ensemble of the ``views`` segmenters."""
        return {ENSEMBLE_VIEWS: self.params.views}

    def eval_model(self) -> nn.Module:
        """The views' ensemble: log of the mean of their softmax, each mapped back from its view."""
        self._ensemble.training = all(network.training for network in self._ensemble.networks)
        return self._ensemble
