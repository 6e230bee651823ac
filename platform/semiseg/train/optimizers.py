"""The optimisers a configuration can name (``optim.name``), built for one parameter group."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

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
