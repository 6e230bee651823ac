"""Schedules: consistency ramp-ups, EMA-decay schedules and learning-rate schedules."""

from __future__ import annotations

import math

RAMPUP_SHAPES = ("sigmoid", "linear", "cosine", "none")
LR_SCHEDULES = ("constant", "cosine")


def rampup(epoch: float, rampup_epochs: float, shape: str = "sigmoid") -> float:
    """Weight in [0, 1] of an unsupervised term at fractional ``epoch``.

    ``sigmoid`` is the ramp-up of Laine & Aila used by the mean-teacher papers:
    ``exp(-5 (1 - t)^2)`` with ``t = clip(epoch / rampup_epochs, 0, 1)``; it starts at
    ``exp(-5) ≈ 0.0067``, not at 0.

    Args:
        epoch: fractional epoch (``step / steps_per_epoch``).
        rampup_epochs: epochs to reach 1; ``<= 0`` means no ramp-up.
        shape: ``sigmoid``, ``linear``, ``cosine`` or ``none``.

    Raises:
        ValueError: unknown shape.
    """
    if shape not in RAMPUP_SHAPES:
        raise ValueError(f"unknown ramp-up shape {shape!r}; use one of {RAMPUP_SHAPES}")
    if shape == "none" or rampup_epochs <= 0:
        return 1.0
    t = min(max(epoch / rampup_epochs, 0.0), 1.0)
    if shape == "sigmoid":
        return math.exp(-5.0 * (1.0 - t) ** 2)
    if shape == "linear":
        return t
    return 0.5 * (1.0 - math.cos(math.pi * t))


def ema_decay_at(step: int, epoch: float, decay: float, late_decay: float, switch_epoch: float,
                 warmup: bool = True) -> float:
    """EMA decay of the teacher at a step.

    Perone & Cohen-Adad use 0.99 for the first 50 epochs, then 0.999. With ``warmup``
    the decay is capped by ``1 − 1/(step + 1)`` (Tarvainen & Valpola's reference code),
    so the teacher follows the student closely while the student is still random.

    Args:
        step: global optimiser step (0-based).
        epoch: fractional epoch.
        decay: decay before ``switch_epoch``.
        late_decay: decay from ``switch_epoch`` on; ``<= 0`` keeps ``decay``.
        switch_epoch: epoch at which ``late_decay`` takes over; ``<= 0`` disables.
        warmup: apply the ``1 − 1/(step + 1)`` cap.
    """
    alpha = late_decay if (late_decay > 0 and 0 < switch_epoch <= epoch) else decay
    if warmup:
        alpha = min(1.0 - 1.0 / (step + 1), alpha)
    return alpha


def lr_factor(epoch: float, max_epochs: float, warmup_epochs: float, schedule: str) -> float:
    """Multiplier of the base learning rate at fractional ``epoch``.

    Linear warm-up over ``warmup_epochs`` then ``constant`` or ``cosine`` decay to 0 at
    ``max_epochs``.

    Raises:
        ValueError: unknown schedule.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; use constant or cosine")
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return max(epoch / warmup_epochs, 1e-3)
    if schedule == "constant":
        return 1.0
    span = max(max_epochs - warmup_epochs, 1e-9)
    t = min(max((epoch - warmup_epochs) / span, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))
