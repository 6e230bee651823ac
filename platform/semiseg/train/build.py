"""What a trial builds from its configuration before training: the data split, the method's
build context and the batch sampler, the model spec saved with checkpoints, and the memory
layout of networks and images."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from semiseg.augment import AugmentSettings
from semiseg.config import ConfigError, ExperimentConfig, parse_shape
from semiseg.data.batches import MixedBatchSampler
from semiseg.data.prepared import PreparedData
from semiseg.data.source import configured_split
from semiseg.methods import BuildContext, Method


def prepare_data(cfg: ExperimentConfig, handover: Mapping[str, Any] | None = None) -> PreparedData:
    """The trial's split of its dataset (``data.*``), preprocessed through the cache: the cache the
    study driver prepared when it hands one over (``config[DATASET_KEY]``), else resolved here."""
    return configured_split(cfg.data, handover)


def build_context(cfg: ExperimentConfig, data: PreparedData, device: torch.device) -> BuildContext:
    """What the method builds its networks with: the data's shape, ``model.*``, the augmentation
    ranges (``train.augment_*``, at the labelled cases' spacing), the ramp-up, the supervised loss and the seed."""
    augment = AugmentSettings(rotation_deg=cfg.train.augment_rotation_deg, scale=cfg.train.augment_scale,
                              shift=cfg.train.augment_shift, noise_std=cfg.train.augment_noise_std,
                              intensity=cfg.train.augment_intensity, spacing=data.training_spacing)
    return BuildContext(dims=cfg.data.dims, in_channels=data.in_channels, num_classes=data.num_classes,
                        model={"name": cfg.model.name, "depth": cfg.model.depth, "width": cfg.model.width,
                               "dropout": cfg.model.dropout, "norm": cfg.model.norm},
                        augment=augment, rampup_epochs=cfg.schedule.rampup_epochs,
                        rampup_shape=cfg.schedule.rampup_shape, supervised_loss=cfg.train.supervised_loss,
                        seed=cfg.train.seed, device=str(device))


def batch_sampler(cfg: ExperimentConfig, data: PreparedData, method: Method, rank: int,
                  world_size: int) -> MixedBatchSampler:
    """This rank's mixed labelled/unlabelled batches (no unlabelled images for a method that uses none)."""
    return MixedBatchSampler(data.labelled_images, data.labelled_labels, data.unlabelled_images,
                             labelled_per_batch=cfg.train.labelled_per_batch,
                             unlabelled_per_batch=(cfg.train.batch_size - cfg.train.labelled_per_batch
                                                   if method.uses_unlabelled else 0),
                             rank=rank, world_size=world_size, seed=cfg.train.seed,
                             patch_size=patch_size(cfg), foreground_fraction=cfg.train.foreground_fraction,
                             unlabelled_stream=data.unlabelled_stream, labelled_positions=data.labelled_positions,
                             unlabelled_positions=data.unlabelled_positions)


def model_spec(cfg: ExperimentConfig, data: PreparedData, method: Method) -> dict[str, Any]:
    """What rebuilds the evaluation network from a checkpoint and predicts new scans with it (saved with
    the checkpoint; read by :func:`semiseg.models.evaluation.build_evaluation_network` and ``semiseg-predict``).

    Besides the network: the labels (name to class id), the preprocessing the cases went through
    (a new scan must go through the same), and the inference settings of validation (3D patch
    size and overlap of the sliding windows). The loop adds the post-processing chosen on
    validation at the end of training.
    """
    preprocessing = data.preprocessing.to_dict() if data.preprocessing is not None else None
    patch = patch_size(cfg)
    return {"dims": cfg.data.dims, "in_channels": data.in_channels, "num_classes": data.num_classes,
            "model": dict(vars(cfg.model)), "class_ids": list(data.class_ids), **method.eval_model_spec(),
            "labels": {name: int(value) for name, value in data.labels.items()},
            "preprocessing": preprocessing, "patch_size": list(patch) if patch else None,
            "overlap": float(cfg.train.val_overlap)}


def patch_size(cfg: ExperimentConfig) -> tuple[int, int, int] | None:
    """The 3D training patch, or None for whole samples.

    Raises:
        ConfigError: a patch for 2D training, or not three positive sizes.
    """
    if not cfg.data.patch_size:
        return None
    shape = parse_shape(cfg.data.patch_size, "data.patch_size")
    if cfg.data.dims != 3 or len(shape) != 3:
        raise ConfigError(f"data.patch_size {cfg.data.patch_size!r} needs data.dims=3 and three sizes")
    return shape  # type: ignore[return-value]


def memory_format(cfg: ExperimentConfig) -> torch.memory_format | None:
    """Channels-last layout for networks and images when ``train.channels_last`` (the default:
    whole training epochs on CPU took 1.06–1.39× less time with it, 2D and 3D, for every
    method measured; and it is what AMP convolutions want on GPUs)."""
    if not cfg.train.channels_last:
        return None
    return torch.channels_last if cfg.data.dims == 2 else torch.channels_last_3d


def apply_memory_format(method: Method, cfg: ExperimentConfig) -> None:
    """Put every network of ``method`` in the layout ``train.channels_last`` asks for (no-op when off).

    The loop's epochs convert each batch's images to the same layout.
    """
    layout = memory_format(cfg)
    if layout is not None:
        for module in [*method.trained.values(), *method.frozen.values()]:
            module.to(memory_format=layout)


def images_in_layout(batch: Mapping[str, torch.Tensor], memory_format: torch.memory_format
                     ) -> dict[str, torch.Tensor]:
    """``batch`` with its images (``image*`` keys) in ``memory_format``; labels as they are."""
    return {key: value.contiguous(memory_format=memory_format) if key.startswith("image") else value
            for key, value in batch.items()}
