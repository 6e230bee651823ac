"""The workloads the sections time: phantom data, the platform's training step, a bare loop.

The platform's step is the training loop's own code: :func:`semiseg.train.loop.train_epoch`
(learning-rate schedule, ``method.training_step``, the finite-loss check, the loop's
``backward_and_step`` with gradient clipping, ``method.after_step`` and the log
accumulation), fed pre-drawn batches so that data loading is not part of the step. The
bare loop is what a hand-written PyTorch script would do with the same network, batches
and threads: forward, Dice + cross-entropy, backward, AdamW step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F

from semiseg.config import ExperimentConfig
from semiseg.data.batches import MixedBatchSampler
from semiseg.data.phantom import generate_phantom
from semiseg.data.prepared import PreparedData, prepare_split
from semiseg.methods import Method, build_method
from semiseg.methods.registry import experiment_config as registered_experiment_config
from semiseg.train.build import apply_memory_format, build_context, images_in_layout, memory_format
from semiseg.train.checkpoint import LoopState
from semiseg.train.distributed import GradientSync
from semiseg.train.loop import train_epoch
from semiseg.train.optimizers import build_optimizers

ZERO_AUGMENT = {"train.augment_rotation_deg": 0.0, "train.augment_scale": 0.0, "train.augment_shift": 0.0,
                "train.augment_noise_std": 0.0, "train.augment_intensity": 0.0}
"""Config overrides that make every augmentation an identity (the like-for-like comparison)."""

METHOD_PARAMS: dict[str, dict[str, Any]] = {"contrastive_pretrain": {"pretrain_epochs": 1}}
"""Per-method overrides: contrastive pretraining is timed on its pretext step (its point)."""


@dataclass(frozen=True)
class StepShape:
    """The problem every step-level section times.

    Attributes:
        image: in-plane size of the 2D phantom slices.
        slices: slices per phantom case.
        cases: phantom cases (4 labelled, 1 validation, 1 test, the rest unlabelled).
        width, depth: U-Net width and depth (``model.width``, ``model.depth``).
        batch: images per step; semi-supervised methods get half labelled, half unlabelled,
            the supervised step and the bare loop get ``batch`` labelled images.
        threads: torch intra-op threads (``train.threads``; the platform's default is 1 per trial).
    """

    image: int = 64
    slices: int = 8
    cases: int = 12
    width: int = 16
    depth: int = 3
    batch: int = 8
    threads: int = 1

    def describe(self) -> str:
        """One line for the report."""
        return (f"2D U-Net width {self.width} depth {self.depth}, {self.image}x{self.image} phantom slices, "
                f"{self.batch} images per step, {self.threads} thread(s)")

    def to_dict(self) -> dict[str, Any]:
        """The shape as JSON-able data."""
        return asdict(self)


def device() -> torch.device:
    """CUDA when available (a lent GPU machine), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    """Wait for queued GPU work so that wall time measures it (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def phantom_data(shape: StepShape, workdir: Path, loader: str = "memory") -> PreparedData:
    """Generate (or reuse) a phantom under ``workdir`` and prepare its 2D split through the cache
    (``loader="stream"``: the unlabelled slices stream from it)."""
    root = workdir / f"phantom-{shape.image}x{shape.image}x{shape.slices}-{shape.cases}"
    layout = generate_phantom(root, num_training=shape.cases, num_test=0,
                              shape=(shape.image, shape.image, shape.slices), seed=0)
    return prepare_split(layout, num_labelled=4, num_validation=1, num_test=1, split_seed=0, dims=2,
                         cache_root=workdir / "prepared", loader=loader)


def sampler(data: PreparedData, labelled: int, unlabelled: int, seed: int = 0) -> MixedBatchSampler:
    """The loop's batch sampler over the prepared training slices."""
    return MixedBatchSampler(data.labelled_images, data.labelled_labels, data.unlabelled_images,
                             labelled_per_batch=labelled, unlabelled_per_batch=unlabelled, seed=seed,
                             unlabelled_stream=data.unlabelled_stream)


def draw_batches(data: PreparedData, shape: StepShape, count: int, semi: bool) -> list[dict[str, torch.Tensor]]:
    """``count`` batches on the benchmark device: half labelled/half unlabelled when ``semi``."""
    labelled = shape.batch // 2 if semi else shape.batch
    drawn = sampler(data, labelled, shape.batch - labelled if semi else 0).epoch(0, count, device())
    return list(drawn)


class FixedBatches:
    """A stand-in for :class:`MixedBatchSampler` that replays pre-drawn batches."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def epoch(self, epoch: int, steps: int, device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``steps`` batches, cycling through the stored ones."""
        for index in range(steps):
            yield self.batches[index % len(self.batches)]


def experiment_config(shape: StepShape, method: str, steps: int, augment: bool,
                      overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """The typed config of a timed step: the method's defaults, the shape, identity augmentation unless ``augment``."""
    flat: dict[str, Any] = {"method.name": method, "model.width": shape.width, "model.depth": shape.depth,
                            "train.batch_size": shape.batch, "train.labelled_per_batch": max(1, shape.batch // 2),
                            "train.steps_per_epoch": steps, "train.max_epochs": 1000, "train.threads": shape.threads}
    flat.update({f"method.{k}": v for k, v in METHOD_PARAMS.get(method, {}).items()})
    if not augment:
        flat.update(ZERO_AUGMENT)
    flat.update(overrides or {})
    return registered_experiment_config(flat)


class PlatformStep:
    """``steps`` optimiser steps of a method through the training loop's ``train_epoch``.

    The networks take the layout ``train.channels_last`` asks for, as in ``run_training``;
    ``train_epoch`` converts the batches' images to it.
    """

    def __init__(self, cfg: ExperimentConfig, data: PreparedData, batches: list[dict[str, torch.Tensor]]) -> None:
        self.cfg = cfg
        self.method: Method = build_method(cfg.method["name"], build_context(cfg, data, device()), cfg.method)
        apply_memory_format(self.method, cfg)
        self.optimizers = build_optimizers(self.method, cfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.batches = FixedBatches(batches)
        self.state = LoopState()
        self.sync = GradientSync([], 1)

    def __call__(self) -> None:
        """Run one 'epoch' of ``train.steps_per_epoch`` steps."""
        train_epoch(self.cfg, self.method, self.optimizers, self.scaler, self.batches, self.state, device(),
                    self.sync)
        synchronize()


def dice_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft Dice (foreground classes, batch sums) + cross-entropy, written out in plain torch."""
    probs = logits.float().softmax(dim=1)
    target = F.one_hot(labels, probs.shape[1]).movedim(-1, 1).float()
    dims = [0, *range(2, probs.ndim)]
    dice = (2 * (probs * target).sum(dims) + 1e-5) / (probs.sum(dims) + target.sum(dims) + 1e-5)
    return (1.0 - dice[1:].mean()) + F.cross_entropy(logits.float(), labels)


class BareStep:
    """``steps`` steps of a hand-written loop: forward, Dice + CE, backward, AdamW (no augmentation)."""

    def __init__(self, network: torch.nn.Module, batches: list[dict[str, torch.Tensor]], steps: int,
                 lr: float, weight_decay: float) -> None:
        self.network = network.train()
        self.optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
        self.batches = batches
        self.steps = steps

    def __call__(self) -> None:
        """Run the steps."""
        for index in range(self.steps):
            batch = self.batches[index % len(self.batches)]
            loss = dice_ce(self.network(batch["image_l"]), batch["label_l"])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        synchronize()


class ForwardOnly:
    """``steps`` no-grad eval-mode forwards of a network (a teacher's pass)."""

    def __init__(self, network: torch.nn.Module, batches: list[dict[str, torch.Tensor]], steps: int) -> None:
        self.network = network
        self.batches = batches
        self.steps = steps

    @torch.no_grad()
    def __call__(self) -> None:
        """Run the forwards."""
        self.network.eval()
        for index in range(self.steps):
            self.network(self.batches[index % len(self.batches)]["image_l"])
        synchronize()


class WithThreads:
    """Run a unit of work with a different number of torch threads, then restore the setting."""

    def __init__(self, work: Any, threads: int) -> None:
        self.work = work
        self.threads = threads

    def __call__(self) -> None:
        """Run the work with ``threads`` intra-op threads."""
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            self.work()
        finally:
            torch.set_num_threads(previous)


def bare_step(cfg: ExperimentConfig, data: PreparedData, batches: list[dict[str, torch.Tensor]],
              steps: int) -> BareStep:
    """A bare loop on the network the platform's step would build for ``cfg``: same init, optimiser
    settings and memory layout (network and images channels-last when ``train.channels_last``)."""
    network = build_context(cfg, data, device()).build_network()
    layout = memory_format(cfg)
    if layout is not None:
        network = network.to(memory_format=layout)
        batches = [images_in_layout(batch, layout) for batch in batches]
    return BareStep(network, batches, steps, cfg.optim.lr, cfg.optim.weight_decay)
