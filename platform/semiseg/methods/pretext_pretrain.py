"""Self-supervised pretext pretraining of the encoder, then supervised fine-tuning.

Taleb et al., "3D self-supervised methods for medical imaging" (NeurIPS 2020), with the
pretext tasks of Gidaris et al., "Unsupervised representation learning by predicting
image rotations" (ICLR 2018) and Noroozi & Favaro, "Unsupervised learning of visual
representations by solving jigsaw puzzles" (ECCV 2016). Pieces: :mod:`semiseg.components.pretext`.

- Pretraining stage (the first ``pretrain_epochs`` epochs): every image of the batch,
  labelled and unlabelled (the unlabelled ones are most of them), gets the method's
  random contrast, brightness and noise (not the affine augmentation: its zero-filled
  corners and borders would mark the orientation of a volume and the corner tiles of a
  puzzle, a shortcut), then

  * ``rotation``: the centred square / cube of the image (a quarter turn in a plane of
    unequal sides would change the shape and give the class away; Taleb et al.'s 2D
    code crops to a square the same way) is rotated by a class drawn uniformly, 2D: k·90°
    (k = 0…3, Gidaris et al.), 3D: Taleb et al.'s 10 rotations (the identity, 90°, 180°,
    270° around each axis); the U-Net encoder's bottleneck, global average pooling and a
    linear layer predict the class (cross-entropy).
  * ``jigsaw``: the image is cut into 3×3 (3D: 3×3×3) cells, one tile per cell a little
    smaller than the cell at a random offset (Noroozi's 64 in 75 pixels), each tile
    normalised to zero mean and unit variance (Noroozi), the tiles shuffled by one of
    ``num_permutations`` fixed permutations chosen for their Hamming distance (greedy
    max–min selection, deterministic so every worker and a resumed run agree), each
    tile passed through the *shared* U-Net encoder (tiles shorter than 2^depth voxels on
    an axis are first enlarged by linear interpolation, since a 16-pixel image gives
    5-pixel cells) and pooled; Noroozi's classifier (shared per-tile layer, concatenation,
    two layers) predicts the permutation index (cross-entropy).

  The random draws (intensity, rotation classes, tile offsets, permutation indices)
  come from the method's generator.
- Semi-supervised stage: the whole network is fine-tuned with the supervised loss on
  the augmented labelled images; the pretext head is no longer used.

Defaults: ``task = rotation``: both tasks are studied by Taleb et al. in 2D and 3D;
rotation prediction has no hyperparameter of its own, needs one encoder pass per image
instead of 9 or 27 tile passes, and no tile so small that it must be enlarged, which on
the small patches of this platform makes it the sturdier default (jigsaw is a choice).
``pretrain_epochs = 10`` (search 0…20): a third of the default 30-epoch schedule of
20 steps (200 pretext steps), leaving 20 epochs for fine-tuning; beyond 20 less than a
third of the default schedule would be left to learn the segmentation. (The common
hyperparameter defaults to 0; here 0 would make the method the supervised baseline.)
``num_permutations = 100``: Noroozi & Favaro compare sets of 100 to 1000 permutations;
with small batches and a short stage, fewer classes get more examples each.

Which network each loss trains: the pretext cross-entropy trains the encoder of
``student`` and ``pretext_head`` (the decoder gets no gradient); the supervised loss
trains the whole ``student``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from semiseg.augment import mixed_images, perturb_intensity
from semiseg.components.contrastive import unet_bottleneck
from semiseg.components.pretext import (JigsawHead, RotationHead, centre_cube, extract_tiles, fit_to_encoder,
                                        maximal_hamming_permutations, normalise_tiles, permute_tiles,
                                        rotate_each, rotation_classes, tile_layout)
from semiseg.config import NON_NEGATIVE, Bounds
from semiseg.methods.base import (BuildContext, Method, MethodParams, Progress, StepOutput,
                                  augmented_supervised_loss, hparam)
from semiseg.methods.registry import register_method

JIGSAW_GRID = 3
"""Tiles per axis of a jigsaw puzzle (Noroozi & Favaro: 3×3; Taleb et al. in 3D: 3×3×3)."""


@dataclass(frozen=True)
class PretextPretrainParams(MethodParams):
    """Hyperparameters of pretext pretraining (defaults justified in the module docstring)."""

    pretrain_epochs: int = hparam(10, low=0, high=20, bounds=NON_NEGATIVE,
                                  help="epochs of pretext pretraining before supervised fine-tuning (default: a "
                                       "third of the default 30-epoch schedule)")
    task: str = hparam("rotation", choices=("rotation", "jigsaw"),
                       help="pretext task: rotation prediction (Gidaris 2018; 3D: Taleb's 10 rotations) or "
                            "jigsaw puzzles (Noroozi 2016; 3D: 3x3x3 tiles)")
    num_permutations: int = hparam(100, low=10, high=1000, log=True, bounds=Bounds(2.0),
                                   help="jigsaw: size of the permutation set, the classes (Noroozi: 100 to 1000)")


@register_method
class PretextPretrain(Method):
    """Encoder pretrained on a rotation or jigsaw pretext task, then supervised fine-tuning."""

    name = "pretext_pretrain"
    Params = PretextPretrainParams
    params: PretextPretrainParams
    segmenters = ("student",)
    ddp_find_unused_parameters = True

    def __init__(self, context: BuildContext, params: PretextPretrainParams) -> None:
        super().__init__(context, params)
        self.trained["student"] = context.build_network()
        depth = int(context.model["depth"])
        channels = int(context.model["width"]) * 2 ** depth
        self.minimum_size = 2 ** depth
        self.num_tiles = JIGSAW_GRID ** context.dims
        if params.task == "jigsaw":
            if params.num_permutations > math.factorial(self.num_tiles):
                raise ValueError(f"num_permutations = {params.num_permutations} exceeds the "
                                 f"{math.factorial(self.num_tiles)} permutations of {self.num_tiles} tiles")
            self.permutations = maximal_hamming_permutations(self.num_tiles, params.num_permutations)
        self.trained["pretext_head"] = context.build_module(
            lambda: (RotationHead(channels, rotation_classes(context.dims)) if params.task == "rotation"
                     else JigsawHead(channels, self.num_tiles, params.num_permutations)), seed_offset=1)

    def pretrain_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """Cross-entropy of the pretext classifier on every image of the batch."""
        images = mixed_images(batch)
        images = perturb_intensity(images, self.context.augment, self.generator)
        logits, targets = (self.rotation_logits(images) if self.params.task == "rotation"
                           else self.jigsaw_logits(images))
        loss = F.cross_entropy(logits.float(), targets)
        accuracy = (logits.detach().argmax(dim=1) == targets).float().mean()
        return StepOutput(objectives={"main": loss},
                          logs={"loss_pretext": loss.detach(), "pretext_accuracy": accuracy},
                          unsupervised=loss)

    def rotation_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate the centred square / cube of each image by a random class; return ``(logits, classes)``."""
        classes = torch.randint(rotation_classes(self.context.dims), (images.shape[0],), generator=self.generator)
        rotated = rotate_each(centre_cube(images), classes.to(images.device), self.context.dims)
        features = unet_bottleneck(self.trained["student"], fit_to_encoder(rotated, self.minimum_size))
        return self.trained["pretext_head"](features), classes.to(images.device)

    def jigsaw_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shuffle each image's tiles by a random permutation of the set; return ``(logits, permutation indices)``."""
        count, dims = images.shape[0], self.context.dims
        cells, tiles = tile_layout(images.shape[2:], JIGSAW_GRID)
        slack = torch.tensor([cell - tile for cell, tile in zip(cells, tiles)])
        offsets = (torch.rand((count, self.num_tiles, dims), generator=self.generator) * (slack + 1)).long()
        indices = torch.randint(self.params.num_permutations, (count,), generator=self.generator)
        puzzle = permute_tiles(normalise_tiles(extract_tiles(images, JIGSAW_GRID, cells, tiles, offsets)),
                               self.permutations[indices])
        flat = fit_to_encoder(puzzle.flatten(0, 1), self.minimum_size)
        features = unet_bottleneck(self.trained["student"], flat)
        return self.trained["pretext_head"](features), indices.to(images.device)

    def training_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """Supervised loss on the augmented labelled images (fine-tuning of the whole network)."""
        loss = augmented_supervised_loss(self, self.trained["student"], batch["image_l"], batch["label_l"])
        return StepOutput(objectives={"main": loss}, logs={"loss_sup": loss.detach()})
