"""The optimisers: built by name (``optim.name``) for each of a method's parameter groups, their
learning rate scheduled, and one step of them (backward with AMP scaling, the gradient sync,
clipping)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from semiseg.config import ExperimentConfig
from semiseg.methods import Method

OptimizerBuilder = Callable[[Iterable[torch.nn.Parameter], float, float], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerBuilder] = {
    "adamw": lambda params, lr, weight_decay: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                                                foreach=True),
    "adam": lambda params, lr, weight_decay: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay,
                                                              foreach=True),
    "sgd": lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=0.9,
                                                            nesterov=True, foreach=True),
}
"""``optim.name`` → builder ``(parameters, lr, weight_decay) -> optimizer``; SGD uses Nesterov momentum 0.9."""


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """The optimiser ``name`` over ``params`` (names are checked with the configuration, before Ray starts).

    Raises:
        KeyError: a name not in :data:`OPTIMIZERS`.
    """
    return OPTIMIZERS[name](params, lr, weight_decay)


def build_optimizers(method: Method, cfg: ExperimentConfig) -> dict[str, torch.optim.Optimizer]:
    """One optimiser (``optim.*``) per parameter group of the method, each group's ``base_lr`` recorded
    for :func:`set_learning_rate`: ``optim.lr``, or the group's own rate from
    :meth:`~semiseg.methods.Method.group_learning_rates` (a discriminator's)."""
    optimizers = {}
    own_rates = method.group_learning_rates()
    for group, params in method.optimizer_groups().items():
        lr = own_rates.get(group, cfg.optim.lr)
        optimizers[group] = build_optimizer(cfg.optim.name, params, lr, cfg.optim.weight_decay)
        for param_group in optimizers[group].param_groups:
            param_group["base_lr"] = param_group["lr"]
    return optimizers


def set_learning_rate(optimizers: dict[str, torch.optim.Optimizer], factor: float) -> None:
    """Every parameter group's learning rate: its ``base_lr`` times the schedule's ``factor``."""
    for optimizer in optimizers.values():
        for param_group in optimizer.param_groups:
            param_group["lr"] = param_group["base_lr"] * factor


def backward_and_step(objectives: dict[str, torch.Tensor], optimizers: dict[str, torch.optim.Optimizer],
                      scaler: torch.amp.GradScaler, grad_clip: float, sync: Callable[[], None]) -> None:
    """Back-propagate each objective into its own optimiser's parameters, ``sync`` the gradients
    (workers), clip them to ``grad_clip`` (0: no clipping) and step every optimiser through ``scaler``."""
    names = list(objectives)
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    for position, name in enumerate(names):
        optimizer = optimizers[name]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        retain = position < len(names) - 1
        scaler.scale(objectives[name]).backward(inputs=params, retain_graph=retain)
    sync()
    for name in names:
        optimizer = optimizers[name]
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        scaler.step(optimizer)
    scaler.update()
