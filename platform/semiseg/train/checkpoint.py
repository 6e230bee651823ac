"""The trial state a checkpoint holds: what survives between epochs and across a resume.

One file per checkpoint folder (:data:`~semiseg.train.contract.CHECKPOINT_FILE`): the
method's weights and own state, the optimisers, the AMP scaler, torch's random state, the
loop's counters and history, the best epoch's evaluation weights and the model spec the
runner registers models with; the best epoch's overlay beside it
(:data:`~semiseg.train.contract.OVERLAY_FILE`). Checkpoints are read with
``torch.load(weights_only=True)``: a checkpoint in shared storage must not be able to run code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from semiseg.methods import Method
from semiseg.train.contract import CHECKPOINT_FILE, OVERLAY_FILE


@dataclass
class LoopState:
    """What survives between epochs and across a resume."""

    epoch: int = 0
    step: int = 0
    best_dice: float = -1.0
    best_epoch: int = 0
    best_eval_state: dict | None = None
    diverged: bool = False
    history: list[dict] = field(default_factory=list)
    best_overlay: bytes | None = None


def save_checkpoint(folder: Path, method: Method, optimizers: dict[str, torch.optim.Optimizer],
                    scaler: torch.amp.GradScaler, state: LoopState, model_spec: dict | None) -> None:
    """Write the trial state into ``folder`` (the checkpoint file atomically, then the best overlay)."""
    payload = {"method": method.state_dict(),
               "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
               "scaler": scaler.state_dict(),
               "torch_rng": torch.get_rng_state(),
               "loop": plain({"epoch": state.epoch, "step": state.step, "best_dice": state.best_dice,
                              "best_epoch": state.best_epoch, "diverged": state.diverged,
                              "history": state.history}),
               "best_eval_state": state.best_eval_state,
               "model_spec": plain(model_spec)}
    tmp = folder / (CHECKPOINT_FILE + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, folder / CHECKPOINT_FILE)
    if state.best_overlay is not None:
        (folder / OVERLAY_FILE).write_bytes(state.best_overlay)


def load_checkpoint(folder: Path, method: Method, optimizers: dict[str, torch.optim.Optimizer],
                    scaler: torch.amp.GradScaler) -> LoopState:
    """Restore what :func:`save_checkpoint` wrote in ``folder`` into the method, optimisers, scaler and
    torch's random state; return the loop state to continue from."""
    payload = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    method.load_state_dict(payload["method"])
    for key, optimizer in optimizers.items():
        optimizer.load_state_dict(payload["optimizers"][key])
        for param_group in optimizer.param_groups:
            param_group.setdefault("base_lr", param_group["lr"])
    scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["torch_rng"])
    loop = payload["loop"]
    overlay = folder / OVERLAY_FILE
    return LoopState(epoch=loop["epoch"], step=loop["step"], best_dice=loop["best_dice"],
                     best_epoch=loop["best_epoch"], best_eval_state=payload["best_eval_state"],
                     diverged=loop["diverged"], history=list(loop["history"]),
                     best_overlay=overlay.read_bytes() if overlay.exists() else None)


def plain(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers.

    Checkpoints are read with ``torch.load(weights_only=True)``, whose unpickler refuses numpy
    scalars such as the ``numpy.float64`` a metric can be.
    """
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value
