"""What the two mean-teacher methods share: a student and its EMA teacher.

Not a method (the registry skips this module): :mod:`semiseg.methods.mean_teacher`
(Perone & Cohen-Adad 2018) and :mod:`semiseg.methods.ua_mean_teacher` (Yu et al. 2019)
extend :class:`EmaTeacherMethod` and implement ``training_step``; their papers and
defaults are in their own docstrings.

- ``student``: the one trained network (``self.trained``).
- ``teacher``: a frozen exponential moving average of the student
  (:class:`semiseg.components.ema.EmaTeacher`, ``self.frozen``), updated after every
  optimiser step with the method's decay schedule, reset to the student when the
  semi-supervised stage starts after pretraining, and the network evaluated.
- ``teacher_mode``: ``eval`` (dropout off, BatchNorm running statistics: the teacher
  Perone & Cohen-Adad describe) or ``train`` (the reference codes' ``ema_model.train()``:
  dropout on and BatchNorm normalising with the batch's statistics). Both change the
  targets, so it is a hyperparameter. In ``train`` mode the teacher's BatchNorm momentum is
  0: its running statistics stay the EMA of the student's (a forward pass would otherwise
  move them by each rank's own batch, and ranks would drift apart under DDP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from semiseg.components.ema import EmaTeacher
from semiseg.methods.base import BuildContext, Method, MethodParams, Progress, hparam

TEACHER_MODES = ("eval", "train")


@dataclass(frozen=True)
class EmaTeacherParams(MethodParams):
    """What every EMA-teacher method declares besides its own hyperparameters."""

    teacher_mode: str = hparam("eval", choices=TEACHER_MODES,
                               help="teacher passes in eval mode (dropout off, BatchNorm running statistics) or "
                                    "in train mode as the reference codes run them (dropout on, batch statistics)")


class EmaTeacherMethod(Method):
    """A student trained by the method's losses and its EMA teacher, which is the network evaluated.

    ``params`` must extend :class:`EmaTeacherParams` and have ``ema_decay``; a method with a
    decay schedule overrides :meth:`ema_schedule`.
    """

    params: EmaTeacherParams

    def __init__(self, context: BuildContext, params: EmaTeacherParams) -> None:
        super().__init__(context, params)
        student = context.build_network()
        self.trained["student"] = student
        self.teacher = EmaTeacher(student, *self.ema_schedule())
        self.frozen["teacher"] = self.teacher.module
        if params.teacher_mode == "train":
            for module in self.teacher.module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.momentum = 0.0

    def train(self) -> None:
        """The student in training mode; the teacher in the mode ``teacher_mode`` names."""
        super().train()
        if self.params.teacher_mode == "train":
            self.frozen["teacher"].train()

    def ema_schedule(self) -> tuple[float, float, float]:
        """``(decay, late_decay, switch_epoch)`` of the teacher; by default ``ema_decay`` throughout."""
        return self.params.ema_decay, 0.0, 0.0

    def begin_semi_supervised(self) -> None:
        """After pretraining, the teacher starts as a copy of the pretrained student."""
        self.teacher.reset_to_student()

    def after_step(self, progress: Progress) -> None:
        """EMA update of the teacher with the scheduled (warm-up-capped) decay."""
        self.teacher.update(progress.step, progress.stage_epoch)

    def eval_model(self) -> torch.nn.Module:
        """The EMA teacher (the model Perone & Cohen-Adad evaluate; UA-MT's reference code evaluates the student)."""
        return self.frozen["teacher"]
