"""Exponential moving average of a network's weights (the mean teacher).

θ'_t = α θ'_{t−1} + (1 − α) θ_t (Tarvainen & Valpola 2017, Eq. 1 of Perone & Cohen-Adad
2018), applied with fused multi-tensor ``torch._foreach_lerp_`` so that the update is one
kernel per dtype group instead of one per parameter.

Buffers are handled deliberately: floating buffers (BatchNorm running mean/var) are
averaged like the weights; integer buffers (``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from semiseg.components.parallel import unwrapped


def make_teacher(student: nn.Module) -> nn.Module:
    """Return a frozen deep copy of ``student`` (no gradients, eval mode)."""
    teacher = copy.deepcopy(unwrapped(student))
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    teacher.eval()
    return teacher


class EmaUpdater:
    """Updates a teacher as the EMA of a student, in place.

    The tensor lists are collected once; ``update`` is then one fused lerp over the
    parameters and one over the floating buffers.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        student = unwrapped(student)
        t_params, s_params = list(teacher.parameters()), list(student.parameters())
        if len(t_params) != len(s_params):
            raise ValueError("teacher and student have different parameter lists")
        self.teacher_params = [p.data for p in t_params]
        self.student_params = [p.data for p in s_params]
        t_buffers, s_buffers = list(teacher.buffers()), list(student.buffers())
        self.float_buffers = [(t, s) for t, s in zip(t_buffers, s_buffers) if t.is_floating_point()]
        self.other_buffers = [(t, s) for t, s in zip(t_buffers, s_buffers) if not t.is_floating_point()]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """θ' ← decay·θ' + (1 − decay)·θ for weights and floating buffers.

        Args:
            decay: α in [0, 1]; 0 copies the student, 1 leaves the teacher unchanged.

        Raises:
            ValueError: decay outside [0, 1].
        """
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        weight = 1.0 - decay
        torch._foreach_lerp_(self.teacher_params, self.student_params, weight)
        if self.float_buffers:
            torch._foreach_lerp_([t for t, _ in self.float_buffers], [s for _, s in self.float_buffers], weight)
        for t, s in self.other_buffers:
            t.copy_(s)


class EmaTeacher:
    """A mean teacher: a frozen EMA copy of a student with a decay schedule.

    The decay is ``decay`` until ``switch_epoch`` and ``late_decay`` after it (Perone &
    Cohen-Adad: 0.99, then 0.999 after 50 epochs), capped by ``1 − 1/(step + 1)`` while
    the student is young (Tarvainen & Valpola's warm-up). Epochs count from the start of the
    semi-supervised stage.

    Args:
        student: the network the teacher follows (before any DDP wrapping; the wrapped
            module shares its parameters).
        decay, late_decay, switch_epoch: the schedule (``late_decay`` or ``switch_epoch`` ≤ 0
            keep ``decay``).
    """

    def __init__(self, student: nn.Module, decay: float, late_decay: float = 0.0, switch_epoch: float = 0.0) -> None:
        self.module = make_teacher(student)
        self.student = student
        self.decay, self.late_decay, self.switch_epoch = decay, late_decay, switch_epoch
        self._updater: EmaUpdater | None = None

    def _ema(self) -> EmaUpdater:
        if self._updater is None:
            self._updater = EmaUpdater(self.module, self.student)
        return self._updater

    def update(self, step: int, stage_epoch: float) -> float:
        """One EMA step at the scheduled decay; returns the decay used."""
        from semiseg.schedules import ema_decay_at

        decay = ema_decay_at(step, stage_epoch, self.decay, self.late_decay, self.switch_epoch)
        self._ema().update(decay)
        return decay

    def reset_to_student(self) -> None:
        """Copy the student into the teacher (when the semi-supervised stage starts after pretraining)."""
        self._ema().update(0.0)
