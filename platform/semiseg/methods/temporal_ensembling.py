"""Temporal ensembling (Laine & Aila, ICLR 2017), for segmentation.

"Temporal ensembling for semi-supervised learning" (reference code: s-laine/tempens). Each
training sample has an ensemble ``Z`` of the network's past predictions, an exponential
moving average updated once per epoch, ``Z ← αZ + (1 − α)z`` (α = ``ensemble_momentum``,
paper: 0.6), and the training target is ``Z / (1 − α^t)``, the startup-bias-corrected
ensemble after ``t`` updates of that sample. The network is trained on the supervised loss
plus ``w(t)·MSE(softmax, target)``. One forward pass per sample and step, as in the paper
(the Π-model needs two); the price is the ensemble's memory.

How it is carried over to segmentation here:

- **Which samples and keys.** The samples are named by the batch sampler
  (:class:`semiseg.data.batches.MixedBatchSampler`): ``index_u``/``index_l``, the sample's
  index in the whole unlabelled/labelled pool, and in 3D patch mode ``origin_u``/``origin_l``,
  the patch's first voxel in its volume. A 2D slice has one ensemble map; a 3D volume has one
  map at (padded) volume size, of which each patch reads and updates its window, voxel by
  voxel (:class:`semiseg.components.sample_ensemble.SampleEnsemble`): patches move every
  epoch, so a per-patch ensemble would never be seen twice. Consistency covers labelled and
  unlabelled samples (``cons_on="all"``, as the paper's loss covers the whole minibatch) or
  the unlabelled ones only.
- **Frame.** ``Z`` is stored in the sample's own, un-augmented frame. The prediction that is
  accumulated is the student's training output itself (augmented input, dropout, train-mode
  normalisation, as the paper's ``z_i``), mapped back to the un-augmented frame with the
  inverse of the sample's affine (:func:`semiseg.components.alignment.invert_affine`); voxels the augmented view did not
  cover are not accumulated. An extra un-augmented pass would align exactly but would cost a
  second forward pass per step and would not ensemble over augmentations, the point of the
  method. Reading a target, the ensemble is warped into the student's augmented frame with
  the sample's affine; voxels outside the field of view or without an ensemble yet are masked.
- **Once per epoch.** Predictions are summed during the epoch and ``Z`` is updated in
  :meth:`end_epoch`, once per voxel seen in the epoch (``t`` counts these updates per voxel).
  A sample drawn several times in one epoch (sampling is with replacement) contributes the
  mean of its predictions, per voxel. A sample not drawn keeps its ``Z`` and ``t``.
- **No target yet, no loss.** A voxel with ``t = 0`` has no target and is left out of the
  consistency term (the reference code instead regresses to the zero-initialised targets in
  epoch 0, at a weight ramped near 0). In the first semi-supervised epoch the term is
  therefore 0 and only the supervised loss trains.
- **Weight.** ``w(t) = consistency × ramp-up`` (``schedule.rampup_epochs``/``rampup_shape``;
  the paper: Gaussian ``exp(−5(1 − t/80)²)`` over 80 epochs). The MSE is summed over classes
  and averaged over voxels, the platform's convention (the mean teacher's and the Π-model's),
  so that weights compare across methods. The reference code averages over the C classes
  too and multiplies ``w_max`` = 30 by the labelled fraction M/N; it averages the supervised
  cross-entropy over the whole minibatch with the unlabelled samples masked to 0, so both
  terms carry the factor M/N in expectation and their ratio is ``w_max``. Here the
  supervised loss is a mean over the labelled part of each batch, so the same ratio needs
  no labelled-fraction factor, and the class sum turns the paper's ``w_max/C`` on CIFAR-10
  (C = 10) into the default ``consistency`` = 30/10 = 3 (the Π-model's is 100/10 = 10 by
  the same reading).
- **Memory** (on the CPU, per rank, float32 ``Z`` and int16 ``t``): ``4·C + 2`` bytes per
  voxel of every sample the rank has seen, plus ``4·C + 4`` bytes per voxel of the samples
  seen in the current epoch. For 1,000 slices of 256×256 with 2 classes that is 655 MB
  for the ensembles, and up to 786 MB more during an epoch. It is in every checkpoint.
- **Several workers.** Each rank keeps the ensembles of the samples it draws (its disjoint
  part of each pool). The networks stay identical across ranks (DDP averages the gradients;
  the ensembles only shape each rank's loss). Only rank 0 writes checkpoints, so after a
  resume every rank starts from rank 0's ensembles: rank 0 continues exactly, the other
  ranks' samples have no target for one epoch (their entries are rebuilt from that epoch's
  predictions; rank 0's entries they hold are never drawn by them, except when a pool is
  smaller than the world and every rank draws all of it). A resume with one worker is exact.
- The evaluated network is the student.

Which network each loss trains: the supervised loss and the consistency term both train
the student (the one network); the targets are detached ensembles and receive no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from semiseg.augment import valid_mask, warp
from semiseg.components.alignment import invert_affine
from semiseg.components.sample_ensemble import SampleEnsemble
from semiseg.config import FRACTION, NON_NEGATIVE
from semiseg.losses import consistency_loss, supervised_loss
from semiseg.methods.base import BuildContext, Method, MethodParams, Progress, StepOutput, hparam
from semiseg.methods.registry import register_method

CONSISTENCY_TARGETS = ("all", "unlabelled")
PARTS = {"l": "labelled", "u": "unlabelled"}


@dataclass(frozen=True)
class TemporalEnsemblingParams(MethodParams):
    """Hyperparameters of temporal ensembling (defaults and ranges: see the module docstring)."""

    ensemble_momentum: float = hparam(0.6, low=0.3, high=0.9, bounds=FRACTION,
                                      help="α of the per-sample ensemble Z ← αZ + (1 − α)z, once per epoch "
                                           "(paper: 0.6)")
    consistency: float = hparam(3.0, low=0.3, high=30.0, log=True, bounds=NON_NEGATIVE,
                                help="weight of the class-summed MSE to the ensemble after ramp-up (paper: w_max 30 "
                                     "on a mean over CIFAR-10's 10 classes, i.e. 3 here)")
    cons_on: str = hparam("all", choices=CONSISTENCY_TARGETS,
                          help="samples given an ensemble target: all (paper: the whole minibatch) or unlabelled")


@register_method
class TemporalEnsembling(Method):
    """One network trained on labels and on its per-sample ensemble of past predictions."""

    name = "temporal_ensembling"
    Params = TemporalEnsemblingParams
    params: TemporalEnsemblingParams

    def __init__(self, context: BuildContext, params: TemporalEnsemblingParams) -> None:
        super().__init__(context, params)
        self.trained["student"] = context.build_network()
        parts = ("l", "u") if params.cons_on == "all" else ("u",)
        self.ensembles = {part: SampleEnsemble(params.ensemble_momentum, context.num_classes) for part in parts}

    def training_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """Supervised loss on the labelled part, ramped MSE to the ensemble targets; accumulates the predictions.

        Raises:
            ValueError: the batch does not name its samples (``index_l``/``index_u``).
        """
        augmented = self.augment_batch(batch)
        logits = self.trained["student"](augmented.images)
        loss_sup = supervised_loss(self.context.supervised_loss, logits[:augmented.n_l], augmented.labels)
        rows = self._rows(batch, augmented.n_l)
        spatial = tuple(logits.shape[2:])
        targets, masks = [], []
        with torch.no_grad():
            probs = logits.detach().float().softmax(dim=1)
            for part, (start, stop) in rows.items():
                indices, origins = batch[f"index_{part}"], batch.get(f"origin_{part}")
                theta = augmented.theta[start:stop].float()
                target, known = (t.to(logits.device) for t in self.ensembles[part].targets(indices, origins, spatial))
                targets.append(warp(target, theta))
                masks.append(valid_mask(target, theta) * (warp(known.float(), theta) > 0.999).float())
                inverse = invert_affine(theta)
                self.ensembles[part].accumulate(indices, origins, warp(probs[start:stop], inverse),
                                                valid_mask(probs[start:stop], inverse))
        if rows:
            student = torch.cat([logits[start:stop] for start, stop in rows.values()])
            mask = torch.cat(masks)
            loss_cons = consistency_loss("mse", student, torch.cat(targets), mask)
            target_fraction = float(mask.mean())
        else:
            loss_cons, target_fraction = logits.sum() * 0.0, 0.0
        weight = self.cons_weight(progress, self.params.consistency)
        return StepOutput(objectives={"main": loss_sup + weight * loss_cons},
                          logs={"loss_sup": loss_sup.detach(), "loss_cons": loss_cons.detach(), "cons_weight": weight,
                                "target_fraction": target_fraction},
                          unsupervised=loss_cons)

    def end_epoch(self, epoch: int, train_logs: Mapping[str, float]) -> None:
        """Fold the epoch's predictions into the ensembles (once per sample and voxel seen)."""
        for ensemble in self.ensembles.values():
            ensemble.update()

    def extra_state(self) -> dict[str, Any]:
        """The ensembles of the samples this rank has seen (and any predictions of an unfinished epoch)."""
        return {PARTS[part]: ensemble.state_dict() for part, ensemble in self.ensembles.items()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`extra_state` (ensembles absent from ``state`` start empty)."""
        for part, ensemble in self.ensembles.items():
            if PARTS[part] in state:
                ensemble.load_state_dict(state[PARTS[part]])

    def _rows(self, batch: Mapping[str, torch.Tensor], n_l: int) -> dict[str, tuple[int, int]]:
        """Rows of the augmented batch per part given a target: ``l`` (labelled) first, then ``u``."""
        sizes = {"l": n_l, "u": batch["image_u"].shape[0] if "image_u" in batch else 0}
        rows, start = {}, 0
        for part in ("l", "u"):
            stop = start + sizes[part]
            if part in self.ensembles and stop > start:
                if f"index_{part}" not in batch:
                    raise ValueError(f"temporal_ensembling needs index_{part} in every batch (each sample's index in "
                                     "its pool, from MixedBatchSampler) to keep its ensemble")
                rows[part] = (start, stop)
            start = stop
        return rows
