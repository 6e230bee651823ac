"""Contrastive pretraining of the encoder (global loss) and of the decoder (local loss), then fine-tuning.

Chaitanya, Erdil, Karani & Konukoglu, "Contrastive learning of global and local features for
medical image segmentation with limited annotations", NeurIPS 2020 (reference code:
github.com/krishnabits001/domain_specific_cl). Every image of the batch, labelled and
unlabelled, is used without its label during pretraining.

Stages (``pretrain_epochs`` in all, counted in fractional epochs):

1. Global stage (the first ``pretrain_epochs * (1 - local_fraction)`` epochs, all of them when
   ``strategy`` has no local part): every image is augmented twice independently (affine +
   intensity); the U-Net's encoder up to the bottleneck, global average pooling and the
   projection head g_1 (``projection``) map both views to ``projection_dim`` vectors, and the
   global contrastive loss with temperature ``temperature`` is applied:

   - ``global_random`` (G^R, SimCLR's NT-Xent): an image's only positive is its other view;
     every other image of the batch is a negative.
   - ``global_domain`` (G^D): each volume is split into ``partitions`` equal partitions along
     the slice axis (partition = min(S − 1, ⌊position · S⌋) of the slice's relative position,
     batch keys ``position_l``/``position_u``); an image's positives are its other view and
     the images (both views) of the same partition, of other volumes (or of its own, when the
     random batch holds two of its slices there); its negatives are the images of the other
     partitions. A batch whose images all lie in one partition has no negatives: its loss is 0
     (logged as ``domain_partitions`` = 1, with a warning once; whole 3D volumes, whose
     positions are all alike, are always in that case, and a domain strategy with whole 3D
     volumes is refused before Ray starts: use a ``global_random`` strategy or patches). Each positive pair has its own term whose denominator
     is the pair plus the negatives (the paper's Eq. 1).

2. Local stage (the remaining ``pretrain_epochs * local_fraction`` epochs, strategies ``…+local``):
   the encoder is frozen (run without gradient) and the decoder blocks up to the one at
   1/``local_feature_stride`` of the input resolution are trained with the local loss L: two
   views of every image differing only by intensity augmentation (so that positions
   correspond), their decoder feature maps projected by two 1×1 convolutions g_2
   (``local_projection``), averaged over local regions of ``local_region_size`` pixels per
   axis, ``local_regions`` per axis evenly spread from border to border; the positive of a
   region is the same region in the other view, its negatives the other regions of both views
   of the same image (NT-Xent over regions, temperature ``temperature``).

3. Semi-supervised stage: the whole network is fine-tuned with the supervised loss on the
   augmented labelled images; the projection heads are no longer used.

Which network each loss trains: the global loss trains the encoder of ``student`` and g_1
(``projection``), the decoder gets no gradient; the local loss trains the first decoder blocks
(up-sampling and convolution) of ``student`` and g_2 (``local_projection``), the encoder gets no
gradient; the supervised loss trains the whole ``student``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping

import torch

from semiseg.augment import augment_images, mixed_images, perturb_intensity
from semiseg.components.contrastive import (LocalProjectionHead, ProjectionHead, domain_contrastive_loss,
                                            local_contrastive_loss, nt_xent_loss, slice_partitions,
                                            unet_bottleneck, unet_decoder_features)
from semiseg.config import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, Bounds, ConfigError
from semiseg.methods.base import (BuildContext, Method, MethodParams, Progress, StepOutput,
                                  augmented_supervised_loss, hparam)
from semiseg.methods.registry import register_method

STRATEGIES = ("global_random", "global_domain", "global_random+local", "global_domain+local")
"""The pretraining strategies: the global loss's positives (random: the other view only; domain:
also the same partition of other volumes), then optionally the local loss on the decoder."""

log = logging.getLogger(__name__)

LOCAL_FEATURE_STRIDES = (1, 2, 4, 8)
"""Resolutions (1/stride of the input) of the decoder feature map the local loss can use."""


@dataclass(frozen=True)
class ContrastivePretrainParams(MethodParams):
    """Hyperparameters of global (+ local) contrastive pretraining; its length is ``pretrain_epochs``."""

    pretrain_epochs: int = hparam(10, low=0, high=20, bounds=NON_NEGATIVE,
                                  help="epochs of contrastive pretraining (global, then local) before supervised "
                                       "fine-tuning: a third of the default 30-epoch budget (0: supervised only)")
    strategy: str = hparam("global_domain+local", choices=STRATEGIES,
                           help="global positives random (G^R) or same partition (G^D), then optionally the "
                                "local loss (paper's best: global_domain+local)")
    temperature: float = hparam(0.1, low=0.05, high=0.5, log=True, bounds=POSITIVE,
                                help="τ of the global and local losses (paper: 0.1)")
    projection_dim: int = hparam(128, bounds=AT_LEAST_ONE,
                                 help="output dimension of the global projection head g_1 (paper: 128)")
    partitions: int = hparam(4, low=2, high=6, bounds=AT_LEAST_ONE,
                             help="partitions S of each volume along the slice axis for G^D (paper: 4)")
    local_fraction: float = hparam(0.5, low=0.25, high=0.75, bounds=FRACTION,
                                   help="share of pretrain_epochs spent on the local (decoder) stage, after the "
                                        "global one (reference code: 10k iterations each, 0.5)")
    local_feature_stride: int = hparam(4, choices=LOCAL_FEATURE_STRIDES,
                                       help="the local loss uses the decoder block at 1/stride of the input "
                                            "resolution (paper: 3 of 5 blocks, 1/4); a shallower U-Net uses "
                                            "its first block")
    local_region_size: int = hparam(3, low=1, high=5, bounds=AT_LEAST_ONE,
                                    help="pixels per axis of a local region (paper: 3×3)")
    local_regions: int = hparam(4, low=3, high=6, bounds=Bounds(2.0),
                                help="local regions per axis, evenly spread (paper: 13 regions on a 2D map; "
                                     "4 per axis gives 16)")


@register_method
class ContrastivePretrain(Method):
    """Encoder pretrained with a global contrastive loss, decoder with a local one, then supervised fine-tuning."""

    name = "contrastive_pretrain"
    Params = ContrastivePretrainParams
    params: ContrastivePretrainParams
    segmenters = ("student",)
    ddp_find_unused_parameters = True

    def __init__(self, context: BuildContext, params: ContrastivePretrainParams) -> None:
        super().__init__(context, params)
        self.trained["student"] = context.build_network()
        depth, width = int(context.model["depth"]), int(context.model["width"])
        self.trained["projection"] = context.build_module(
            lambda: ProjectionHead(width * 2 ** depth, params.projection_dim), seed_offset=1)
        self.local_blocks = _local_decoder_blocks(depth, params.local_feature_stride)
        self._warned_single_partition = False
        if self.has_local_stage:
            self.trained["local_projection"] = context.build_module(
                lambda: LocalProjectionHead(context.dims, width * 2 ** (depth - self.local_blocks)), seed_offset=2)

    @property
    def has_local_stage(self) -> bool:
        """Whether the strategy pretrains the decoder with the local loss after the global stage."""
        return self.params.strategy.endswith("+local")

    @property
    def local_start_epoch(self) -> float:
        """Fractional epoch at which the local stage starts (``pretrain_epochs`` when there is none)."""
        epochs = self.params.pretrain_epochs
        return epochs * (1.0 - self.params.local_fraction) if self.has_local_stage else float(epochs)

    def pretrain_phase(self, progress: Progress) -> str:
        """``global`` or ``local``: the pretraining stage at ``progress.epoch``."""
        return "local" if self.has_local_stage and progress.epoch >= self.local_start_epoch else "global"

    def pretrain_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """The global loss (encoder) or, in the local stage, the local loss (decoder, frozen encoder)."""
        local = self.pretrain_phase(progress) == "local"
        logs: dict[str, float] = {"pretrain_local": float(local)}
        loss = self._local_loss(mixed_images(batch)) if local else self._global_loss(batch, logs)
        return StepOutput(objectives={"main": loss}, logs={"loss_cons": loss.detach(), **logs}, unsupervised=loss)

    def training_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """The supervised loss on the augmented labelled images (fine-tuning of the whole network)."""
        loss = augmented_supervised_loss(self, self.trained["student"], batch["image_l"], batch["label_l"])
        return StepOutput(objectives={"main": loss}, logs={"loss_sup": loss.detach()})

    def _global_loss(self, batch: Mapping[str, torch.Tensor], logs: dict[str, float]) -> torch.Tensor:
        """G^R or G^D between two affine + intensity views of every image of the batch.

        Under G^D, ``logs`` gets ``domain_partitions``, the number of partitions the batch
        covers: with one, no image has a negative and the loss is 0 (a warning says so once).
        """
        partitions = None
        if self.params.strategy.startswith("global_domain"):
            partitions = slice_partitions(self._positions(batch), self.params.partitions)
            logs["domain_partitions"] = float(partitions.unique().numel())
            if logs["domain_partitions"] < 2 and not self._warned_single_partition:
                self._warned_single_partition = True
                log.warning("contrastive_pretrain: every image of a batch lies in slice partition %d, so G^D has "
                            "no negatives and the step trains nothing; if the slice positions are all equal "
                            "(whole 3D volumes), use strategy global_random or global_random+local",
                            int(partitions[0]))
        images = mixed_images(batch)
        views = torch.cat([self._augment(images), self._augment(images)])
        projections = self.trained["projection"](unet_bottleneck(self.trained["student"], views))
        z1, z2 = projections.chunk(2)
        if partitions is None:
            return nt_xent_loss(z1, z2, self.params.temperature)
        return domain_contrastive_loss(z1, z2, partitions, self.params.temperature)

    def _local_loss(self, images: torch.Tensor) -> torch.Tensor:
        """L between two intensity-only views, on the decoder's feature maps, the encoder frozen."""
        settings = self.context.augment
        views = torch.cat([perturb_intensity(images, settings, self.generator),
                           perturb_intensity(images, settings, self.generator)])
        features = unet_decoder_features(self.trained["student"], views, self.local_blocks, frozen_encoder=True)
        f1, f2 = self.trained["local_projection"](features).chunk(2)
        return local_contrastive_loss(f1, f2, self.params.local_region_size, self.params.local_regions,
                                      self.params.temperature)

    @classmethod
    def check_setting(cls, params: ContrastivePretrainParams, dims: int, patch_size: str) -> None:
        """A domain strategy (G^D) needs images at different positions of their volumes: 2D slices or 3D
        patches, not whole 3D volumes (all at one position, so the loss would have no negatives).

        Raises:
            ConfigError: a ``global_domain`` strategy with ``data.dims = 3`` and no ``data.patch_size``.
        """
        if params.strategy.startswith("global_domain") and dims == 3 and not patch_size:
            raise ConfigError(f"method.strategy = {params.strategy!r} is not allowed with whole 3D volumes "
                              "(data.dims = 3 without data.patch_size): G^D contrasts slices or patches from "
                              "different partitions of their volumes; set data.patch_size or "
                              f"method.strategy={params.strategy.replace('global_domain', 'global_random')}")

    def _positions(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Relative slice positions of the images of :func:`mixed_images` (labelled, then unlabelled).

        Raises:
            KeyError: a position key the batch lacks (G^D needs them).
        """
        keys = ["position_l", *(["position_u"] if "image_u" in batch else [])]
        for key in keys:
            if key not in batch:
                raise KeyError(f"contrastive_pretrain strategy {self.params.strategy!r} needs the batch key {key!r} "
                               f"(relative position of each slice in its volume); use a global_random strategy "
                               f"for data without slice positions")
        return torch.cat([batch[key].reshape(-1) for key in keys])

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        """One random affine + intensity view of ``images``."""
        return augment_images(images, self.context.dims, self.context.augment, self.generator)[0]


def _local_decoder_blocks(depth: int, stride: int) -> int:
    """Number of decoder blocks up to the one at 1/``stride`` resolution (at least the first, at most all)."""
    return max(1, min(depth, depth - int(math.log2(stride))))
