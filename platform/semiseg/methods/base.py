"""What every method shares: hyperparameter declarations, the build context, progress.

A method is a class registered under its file's name (see
:mod:`semiseg.methods.registry`). It owns its networks, declares its hyperparameters
(defaults and default search ranges from its paper) and implements:

- ``training_step(batch, progress) -> StepOutput``: the losses of one step; the loop
  owns backward, optimisers and AMP;
- ``after_step(progress)``: EMA updates and the like, after the optimiser step;
- ``eval_model()``: the network used for validation (the teacher for mean teacher);
- ``optimizer_groups()``: named parameter lists, one optimiser each;
- ``state_dict()`` / ``load_state_dict()``: everything needed to resume.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from semiseg.augment import AugmentedBatch, AugmentSettings, augment_batch
from semiseg.components.parallel import unwrapped
from semiseg.config import NON_NEGATIVE, Bounds, check_value
from semiseg.losses import supervised_loss
from semiseg.models import build_model

HPARAM_METADATA = "semiseg.hparam"


@dataclass(frozen=True)
class HParam:
    """A method hyperparameter: its default, the values it may take and its default search range.

    Attributes:
        default: value used when a study does not set it (from the method's paper).
        low, high: numeric search range (inclusive).
        log: search on a log scale.
        complement: search ``1 - value`` on a log scale (EMA decays: 0.9 … 0.9999).
        choices: the values a categorical hyperparameter may take (and its search values).
        bounds: the values a numeric hyperparameter may take at all (e.g. a decay in (0, 1));
            checked when a configuration sets it, and the search range must lie inside.
        help: one line shown in ``--help-method`` and the docs.

    Raises:
        ValueError: a declaration whose default or search range breaks its own bounds or choices.
    """

    default: Any
    low: float | None = None
    high: float | None = None
    log: bool = False
    complement: bool = False
    choices: Sequence[Any] | None = None
    bounds: Bounds | None = None
    help: str = ""

    def __post_init__(self) -> None:
        check_value("default", self.default, self.bounds, self.choices)
        if self.choices is None and self.low is not None and self.high is not None:
            for end in (self.low, self.high):
                check_value("search range end", end, self.bounds)

    @property
    def searchable(self) -> bool:
        """Whether the hyperparameter has a default search range."""
        return self.choices is not None or (self.low is not None and self.high is not None)


def hparam(default: Any, *, low: float | None = None, high: float | None = None, log: bool = False,
           complement: bool = False, choices: Sequence[Any] | None = None, bounds: Bounds | None = None,
           help: str = "") -> Any:
    """A field of a method's parameter dataclass, declared with its :class:`HParam`.

    Example: ``consistency: float = hparam(1.0, low=0.1, high=30.0, log=True, bounds=NON_NEGATIVE)``.
    """
    declaration = HParam(default, low=low, high=high, log=log, complement=complement, choices=choices,
                         bounds=bounds, help=help)
    return field(default=default, metadata={HPARAM_METADATA: declaration})


@dataclass(frozen=True)
class MethodParams:
    """Hyperparameters every method has; each method's own dataclass extends it."""

    pretrain_epochs: int = hparam(0, low=0, high=20, bounds=NON_NEGATIVE,
                                  help="epochs of supervised (or the method's own pretext) pretraining before the "
                                       "semi-supervised stage, inside the same trial (Bortsova reproduction: 0, 25, "
                                       "120)")


def declared_hparams(params_type: type[MethodParams]) -> dict[str, HParam]:
    """The :class:`HParam` of every field of a method's parameter dataclass, in declaration order.

    Raises:
        TypeError: a field declared without :func:`hparam`, or whose default is not of its type.
    """
    hints = typing.get_type_hints(params_type)
    declared: dict[str, HParam] = {}
    for item in dataclasses.fields(params_type):
        if HPARAM_METADATA not in item.metadata:
            raise TypeError(f"{params_type.__name__}.{item.name} is not declared with hparam()")
        declaration = item.metadata[HPARAM_METADATA]
        expected = hints[item.name]
        if type(declaration.default) is not expected:
            raise TypeError(f"{params_type.__name__}.{item.name}: default {declaration.default!r} is not "
                            f"{getattr(expected, '__name__', expected)}")
        declared[item.name] = declaration
    return declared


@dataclass(frozen=True)
class Progress:
    """Where training is: global step and fractional epoch.

    ``stage_epoch`` counts epochs since the semi-supervised stage started (after any
    pretraining); ramp-ups use it.
    """

    step: int
    epoch: float
    max_epochs: int
    stage_epoch: float = 0.0
    stage: str = "semi"


@dataclass
class StepOutput:
    """Losses of one training step.

    Attributes:
        objectives: one scalar per optimiser group to back-propagate (``main`` for the
            segmenter; e.g. ``discriminator`` for an adversarial method).
        logs: floats or scalar tensors to record (``loss_sup``, ``loss_cons``,
            ``cons_weight``...), without the ``train/`` prefix.
        unsupervised: the method's unsupervised term, still attached to the graph and
            unweighted, so tests can check which networks it trains.
    """

    objectives: dict[str, torch.Tensor]
    logs: dict[str, Any] = field(default_factory=dict)
    unsupervised: torch.Tensor | None = None


@dataclass(frozen=True)
class BuildContext:
    """What a method needs to build its networks."""

    dims: int
    in_channels: int
    num_classes: int
    model: Mapping[str, Any]
    augment: AugmentSettings
    rampup_epochs: float
    rampup_shape: str
    supervised_loss: str = "dice_ce"
    seed: int = 0
    device: str = "cpu"

    def build_module(self, factory: Callable[[], nn.Module], seed_offset: int) -> nn.Module:
        """``factory()`` initialised from ``seed·1000 + seed_offset`` (the global RNG left as it was), on the
        context's device: a method's heads and discriminators, each with its own offset."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1000 + seed_offset)
            module = factory()
        return module.to(self.device)

    def build_network(self, seed_offset: int = 0) -> nn.Module:
        """Build the configured segmentation network, initialised from ``seed·1000 + seed_offset``."""
        return self.build_module(
            lambda: build_model(self.model["name"], dims=self.dims, in_channels=self.in_channels,
                                num_classes=self.num_classes, depth=int(self.model["depth"]),
                                width=int(self.model["width"]), dropout=float(self.model["dropout"]),
                                norm=str(self.model["norm"])), seed_offset)


class Method:
    """Base of the registered methods: storage of networks and the common plumbing.

    Subclasses set ``name``, ``Params`` (a frozen dataclass extending :class:`MethodParams`
    whose fields are declared with :func:`hparam`; the method receives it already checked,
    as ``self.params``) and ``uses_unlabelled``, and implement ``training_step``. Under several workers :meth:`wrap_for_ddp` wraps the networks named in
    ``segmenters`` in ``DistributedDataParallel`` (with ``find_unused_parameters`` when
    ``ddp_find_unused_parameters``: a step leaves part of a network out) and averages the
    gradients of the other trained modules (discriminators, projection heads) itself, so
    any forward pattern (several passes, detached passes) trains identically on every rank. Networks that the loop should wrap in DDP and optimise are put in
    ``self.trained``; networks that are not optimised (EMA teachers) in ``self.frozen``.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    uses_unlabelled: ClassVar[bool] = True
    segmenters: ClassVar[tuple[str, ...]] = ("student",)
    ddp_find_unused_parameters: ClassVar[bool] = False

    def __init__(self, context: BuildContext, params: MethodParams) -> None:
        self.context = context
        self.params = params
        self.trained: dict[str, nn.Module] = {}
        self.frozen: dict[str, nn.Module] = {}
        self.generator = torch.Generator().manual_seed(context.seed)

    @classmethod
    def check_setting(cls, params: MethodParams, dims: int, patch_size: str) -> None:
        """Refuse, before Ray starts, hyperparameters this method cannot train with on data of ``dims``
        spatial dimensions trained as whole samples (``patch_size`` empty) or patches; nothing by default.

        Raises:
            ConfigError: naming the ``method.<key>`` and what to set instead.
        """

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named parameter groups, one optimiser each; ``main`` trains the segmenter."""
        return {"main": [p for m in self.trained.values() for p in m.parameters()]}

    def group_learning_rates(self) -> dict[str, float]:
        """Absolute learning rates of optimiser groups that do not use ``optim.lr`` (e.g. a discriminator's
        own rate, ADVENT's and Hung et al.'s 1e-4); groups not named here use ``optim.lr``. Both follow
        the run's learning-rate schedule."""
        return {}

    def training_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """Return the losses of one step on ``batch`` (keys ``image_l``, ``label_l``, ``image_u``)."""
        raise NotImplementedError

    def pretrain_step(self, batch: Mapping[str, torch.Tensor], progress: Progress) -> StepOutput:
        """One step of the pretraining stage (``method.pretrain_epochs`` > 0).

        By default: the supervised loss of every trained segmenter on the augmented
        labelled batch. A method with another pretext (contrastive pretraining) overrides it.
        """
        losses = [augmented_supervised_loss(self, network, batch["image_l"], batch["label_l"])
                  for key, network in self.trained.items() if key in self.segmenters]
        loss = sum(losses) / len(losses)
        return StepOutput(objectives={"main": loss}, logs={"loss_sup": loss.detach()})

    def progress(self, step: int, epoch: float, max_epochs: int) -> Progress:
        """Where training is in this method's stages at global ``step`` and fractional ``epoch``.

        The first ``pretrain_epochs`` epochs (the hyperparameter every method has) are the
        ``pretrain`` stage, whose steps the loop runs with :meth:`pretrain_step`; then the
        ``semi`` stage, run with :meth:`training_step`, whose ramp-ups count its epochs
        (``stage_epoch``) from its start.
        """
        pretrain_epochs = self.params.pretrain_epochs
        return Progress(step=step, epoch=epoch, max_epochs=max_epochs, stage_epoch=max(0.0, epoch - pretrain_epochs),
                        stage="pretrain" if epoch < pretrain_epochs else "semi")

    def begin_epoch(self, epoch: int) -> None:
        """Hook before epoch ``epoch`` (0-based) trains: calls :meth:`begin_semi_supervised` when it is
        the first epoch of the semi-supervised stage after pretraining (also on a resume there)."""
        if 0 < self.params.pretrain_epochs == epoch:
            self.begin_semi_supervised()

    def begin_semi_supervised(self) -> None:
        """Hook when the semi-supervised stage starts after pretraining (e.g. reset an EMA teacher)."""

    def after_step(self, progress: Progress) -> None:
        """Hook after the optimiser step (EMA updates); nothing by default."""

    def end_epoch(self, epoch: int, train_logs: Mapping[str, float]) -> None:
        """Hook after an epoch with the epoch's mean training logs; nothing by default."""

    def eval_model(self) -> nn.Module:
        """Network used for validation and test."""
        return self.trained["student"]

    def eval_model_spec(self) -> dict[str, Any]:
        """What, besides the architecture, rebuilds :meth:`eval_model` from a checkpoint (see
        :mod:`semiseg.models.evaluation`); nothing for a method evaluated with one segmenter."""
        return {}

    def wrap_for_ddp(self, device_ids: list[int] | None) -> list[nn.Parameter]:
        """Prepare the networks for training under several workers (the loop calls it once, after
        building the method and before building its optimisers).

        Wraps the trained networks named in ``segmenters`` in ``DistributedDataParallel`` on
        ``device_ids`` (None on CPU), with ``find_unused_parameters`` when
        ``ddp_find_unused_parameters``. The other trained modules (discriminators, projection
        heads) stay as they are: their parameters that require gradients are returned, and the
        loop averages those gradients across workers itself after every backward pass.
        """
        manual: list[nn.Parameter] = []
        for key, module in self.trained.items():
            if key in self.segmenters:
                self.trained[key] = nn.parallel.DistributedDataParallel(
                    module, device_ids=device_ids, find_unused_parameters=self.ddp_find_unused_parameters)
            else:
                manual.extend(p for p in module.parameters() if p.requires_grad)
        return manual

    def train(self) -> None:
        """Put every network in training mode (teachers stay in eval unless a method says)."""
        for module in self.trained.values():
            module.train()
        for module in self.frozen.values():
            module.eval()

    def state_dict(self) -> dict[str, Any]:
        """Weights of every network and the method's own state."""
        state = {f"trained.{k}": unwrapped(m).state_dict() for k, m in self.trained.items()}
        state.update({f"frozen.{k}": m.state_dict() for k, m in self.frozen.items()})
        state["generator"] = self.generator.get_state()
        state["extra"] = self.extra_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for key, module in self.trained.items():
            unwrapped(module).load_state_dict(state[f"trained.{key}"])
        for key, module in self.frozen.items():
            module.load_state_dict(state[f"frozen.{key}"])
        self.generator.set_state(state["generator"])
        self.load_extra_state(state.get("extra", {}))

    def extra_state(self) -> dict[str, Any]:
        """Method state other than weights (e.g. an adaptive weight); empty by default."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    def augment_batch(self, batch: Mapping[str, torch.Tensor], *, unlabelled: bool = True) -> AugmentedBatch:
        """The shared affine and intensity augmentation of ``batch``, drawn from the method's generator.

        Labelled images first, then ``image_u`` unless ``unlabelled`` is false; see
        :func:`semiseg.augment.augment_batch`.
        """
        return augment_batch(batch, self.context.dims, self.context.augment, self.generator, unlabelled=unlabelled)

    def cons_weight(self, progress: Progress, weight: float) -> float:
        """``weight`` times the configured ramp-up at the semi-supervised stage's epoch."""
        from semiseg.schedules import rampup

        return weight * rampup(progress.stage_epoch, self.context.rampup_epochs, self.context.rampup_shape)


def augmented_supervised_loss(method: Method, network: nn.Module, images: torch.Tensor,
                              labels: torch.Tensor) -> torch.Tensor:
    """Supervised loss of ``network`` on spatially and intensity-augmented labelled images.

    The default pretraining step; shared by methods whose supervised term is the plain one.
    """
    augmented = method.augment_batch({"image_l": images, "label_l": labels})
    return supervised_loss(method.context.supervised_loss, network(augmented.images), augmented.labels)

