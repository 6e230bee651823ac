"""Random feature embedding for FCNs (Baur, Albarqouni & Navab, 2017).

"Semi-supervised deep learning for fully convolutional networks" (MICCAI 2017),
auxiliary manifold embedding after Weston et al. (2012).

- The network's penultimate per-pixel features h(x) (the last decoder block, at the
  input's resolution, as in the paper) are sampled at n_E = ``num_samples`` pixels per
  batch by one of the paper's strategies (``sampling``: 50/50, distribution-aware, or
  80 % background / 20 % foreground, the paper's best), see
  :mod:`semiseg.components.embedding`.
- Adjacency a_ij = 1 when the two pixels have the same class: the (augmented) label on
  labelled pixels; on unlabelled pixels the prior ``unlabelled_prior``: ``prediction``
  (the network's own detached arg-max) or ``none`` (unlabelled images not used). Pixels
  moved outside the field of view by the augmentation are not sampled.
- Embedding loss (Eq. 2): d(h_i, h_j) for adjacent pairs, max(0, m − d) otherwise, with
  the cosine distance (``acd``; paper: λ = 1, m = 1) or the Euclidean one (``l2``;
  paper: λ = 0.01, m = 1000, to set with ``embedding_weight`` and ``margin``), averaged
  over the sampled pairs; weighted by ``embedding_weight`` times the configured ramp-up.
- Supervised loss: Dice + CE on the labelled images.

Which network each loss trains: both losses train the one network (``student``); the
prior on unlabelled pixels is detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from semiseg.augment import valid_mask
from semiseg.components.embedding import DISTANCES, SAMPLING_STRATEGIES, random_feature_embedding_loss
from semiseg.config import NON_NEGATIVE, POSITIVE, Bounds
from semiseg.losses import supervised_loss
from semiseg.methods.base import BuildContext, Method, MethodParams, Progress, StepOutput, hparam
from semiseg.methods.registry import register_method

UNLABELLED_PRIORS = ("prediction", "none")


@dataclass(frozen=True)
class FeatureEmbeddingParams(MethodParams):
    """Hyperparameters of the random feature embedding (defaults: the paper's final runs)."""

    embedding_weight: float = hparam(1.0, low=0.001, high=10.0, log=True, bounds=NON_NEGATIVE,
                                     help="λ of the embedding loss (paper: 1 with acd, 0.01 with l2)")
    margin: float = hparam(1.0, low=0.25, high=2.0, bounds=POSITIVE,
                           help="margin m for dissimilar pairs (paper: 1 with acd, 1000 with l2)")
    num_samples: int = hparam(100, low=20, high=2000, log=True, bounds=Bounds(2.0),
                              help="n_E pixels sampled per batch (paper: 20 to 2000; 100 in the final runs)")
    sampling: str = hparam("80_20", choices=SAMPLING_STRATEGIES,
                           help="uniform50 (50/50), distribution (class frequencies) or 80_20 "
                                "(80% background, 20% foreground; paper's best)")
    distance: str = hparam("acd", choices=DISTANCES,
                           help="acd (cosine distance, paper's choice) or l2 (set embedding_weight 0.01, "
                                "margin 1000)")
    unlabelled_prior: str = hparam("prediction", choices=UNLABELLED_PRIORS,
                                   help="class of unlabelled pixels: the network's detached arg-max, or none "
                                        "(labelled pixels only)")


@register_method
class FeatureEmbedding(Method):
    """One network trained on labels and on a margin embedding of sampled pixel features."""

    name = "feature_embedding"
    Params = FeatureEmbeddingParams
    params: FeatureEmbeddingParams

    def __init__(self, context: BuildContext, params: FeatureEmbeddingParams) -> None:
        super().__init__(context, params)
        self.trained["student"] = context.build_network()

    def training_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """Supervised loss on the labelled part, ramped embedding loss on sampled pixels."""
        augmented = self.augment_batch(batch, unlabelled=self.params.unlabelled_prior == "prediction")
        logits, features = self.trained["student"](augmented.images, return_features=True)
        loss_sup = supervised_loss(self.context.supervised_loss, logits[:augmented.n_l], augmented.labels)
        classes = self._pixel_classes(augmented.labels, logits, augmented.theta)
        loss_emb = random_feature_embedding_loss(
            features, classes, num_samples=self.params.num_samples, strategy=self.params.sampling,
            distance=self.params.distance, margin=self.params.margin, generator=self.generator)
        weight = self.cons_weight(progress, self.params.embedding_weight)
        return StepOutput(objectives={"main": loss_sup + weight * loss_emb},
                          logs={"loss_sup": loss_sup.detach(), "loss_cons": loss_emb.detach(),
                                "cons_weight": weight},
                          unsupervised=loss_emb)

    @staticmethod
    def _pixel_classes(labels_l: torch.Tensor, logits: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Per-pixel classes of the whole batch: labels, then the detached prediction; −1 outside the view."""
        with torch.no_grad():
            predicted = logits[labels_l.shape[0]:].argmax(dim=1)
            classes = torch.cat([labels_l.long(), predicted.long()])
            inside = valid_mask(logits, theta).squeeze(1) > 0.5
        return torch.where(inside, classes, torch.full_like(classes, -1))
