"""``method.teacher_mode`` of the EMA-teacher methods: eval (default) or the reference codes' train mode."""

from __future__ import annotations

import pytest
import torch

from semiseg.methods import build_method


@pytest.mark.parametrize("name", ["mean_teacher", "ua_mean_teacher"])
def test_eval_mode_teacher_is_deterministic_and_train_mode_teacher_uses_dropout(name, tiny_context):
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for mode, stochastic in (("eval", False), ("train", True)):
        method = build_method(name, tiny_context(2, dropout=0.5), {"teacher_mode": mode})
        method.train()
        teacher = method.frozen["teacher"]
        assert teacher.training is stochastic
        with torch.no_grad():
            first, second = teacher(x), teacher(x)
        assert (not torch.equal(first, second)) is stochastic, mode


def test_train_mode_teacher_normalises_with_batch_statistics_and_keeps_its_running_ones(tiny_context):
    method = build_method("mean_teacher", tiny_context(2, dropout=0.0), {"teacher_mode": "train"})
    method.train()
    teacher = method.frozen["teacher"]
    norm = next(m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = norm.running_mean.clone(), norm.running_var.clone()
    x = 5.0 + 3.0 * torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        in_train_mode = teacher(x)
        teacher.eval()
        in_eval_mode = teacher(x)
    torch.testing.assert_close(norm.running_mean, before[0])
    torch.testing.assert_close(norm.running_var, before[1])
    assert not torch.allclose(in_train_mode, in_eval_mode, atol=1e-3), "batch statistics must change the output"


def test_unknown_teacher_mode_is_refused(tiny_context):
    with pytest.raises(ValueError, match="teacher_mode"):
        build_method("mean_teacher", tiny_context(2), {"teacher_mode": "frozen"})
