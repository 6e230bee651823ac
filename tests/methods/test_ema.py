"""The fused EMA update of a teacher."""

import pytest
import torch
from torch import nn

from semiseg.components.ema import EmaUpdater, make_teacher


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1))


def test_ema_update_matches_the_formula_for_weights_and_buffers():
    student = _net()
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(2.0)
        student[1].num_batches_tracked.fill_(7)
    before = [p.clone() for p in teacher.parameters()]
    EmaUpdater(teacher, student).update(0.9)
    for old, new, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s)
    torch.testing.assert_close(teacher[1].running_mean, torch.full((3,), 0.2))
    assert int(teacher[1].num_batches_tracked) == 7


def test_teacher_is_frozen_and_decay_extremes():
    student = _net()
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(3.0)
    updater = EmaUpdater(teacher, student)
    snapshot = [p.clone() for p in teacher.parameters()]
    updater.update(1.0)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, teacher.parameters()))
    updater.update(0.0)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))
    with pytest.raises(ValueError, match="decay"):
        updater.update(1.5)
