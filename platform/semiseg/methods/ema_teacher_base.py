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
"""

from __future__ import annotations

import torch

from semiseg.components.ema import EmaTeacher
from semiseg.methods.base import BuildContext, Method, MethodParams, Progress


class EmaTeacherMethod(Method):
    """A student trained by the method's losses and its EMA teacher, which is the network evaluated.

    ``params`` must have ``ema_decay``; a method with a decay schedule overrides
    :meth:`ema_schedule`.
    """

    def __init__(self, context: BuildContext, params: MethodParams) -> None:
        super().__init__(context, params)
        student = context.build_network()
        self.trained["student"] = student
        self.teacher = EmaTeacher(student, *self.ema_schedule())
        self.frozen["teacher"] = self.teacher.module

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
