"""UA-MT (Yu et al. 2019): entropy, threshold, masked normalised consistency, MC passes, one step."""

from __future__ import annotations

from dataclasses import replace

import math

import pytest
import torch
from torch import nn

from semiseg.components.uncertainty import (certainty_mask, dropout_active, masked_consistency, mc_teacher_probs,
                                            predictive_entropy, uncertainty_threshold)
from semiseg.methods import Progress, build_method
from semiseg.schedules import rampup

START = Progress(step=0, epoch=0.0, max_epochs=10, stage_epoch=0.0)
END = Progress(step=0, epoch=10.0, max_epochs=10, stage_epoch=10.0)


def _batch(dims: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    spatial = (16, 16) if dims == 2 else (8, 16, 16)
    labels = torch.zeros((2, *spatial), dtype=torch.long)
    labels[(slice(None),) + (slice(3, -3),) * dims] = 1
    return {"image_l": labels[:, None].float() + 0.1 * torch.randn((2, 1, *spatial), generator=gen),
            "label_l": labels, "image_u": torch.randn((2, 1, *spatial), generator=gen)}


@pytest.mark.parametrize("num_classes", [2, 4])
def test_entropy_of_a_uniform_distribution_is_ln_c_and_of_a_certain_one_zero(num_classes):
    uniform = torch.full((1, num_classes, 2, 3), 1.0 / num_classes)
    assert predictive_entropy(uniform).shape == (1, 1, 2, 3)
    torch.testing.assert_close(predictive_entropy(uniform), torch.full((1, 1, 2, 3), math.log(num_classes)),
                               atol=1e-4, rtol=0)
    certain = torch.zeros(1, num_classes, 2, 3)
    certain[:, 0] = 1.0
    assert predictive_entropy(certain).abs().max() < 1e-5


@pytest.mark.parametrize("num_classes", [2, 4])
def test_threshold_ramps_from_three_quarters_of_ln_c_to_ln_c(num_classes):
    ln_c = math.log(num_classes)
    start = uncertainty_threshold(rampup(0.0, 10.0, "sigmoid"), num_classes)
    assert start == pytest.approx((0.75 + 0.25 * math.exp(-5.0)) * ln_c)
    assert uncertainty_threshold(rampup(10.0, 10.0, "sigmoid"), num_classes) == pytest.approx(ln_c)
    with pytest.raises(ValueError):
        uncertainty_threshold(1.5, num_classes)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_the_method_ramps_the_threshold_with_the_configured_rampup(num_classes, tiny_context):
    method = build_method("ua_mean_teacher", tiny_context(num_classes=num_classes, rampup_epochs=10.0),
                          {"mc_passes": 2, "pretrain_epochs": 5})
    method.train()
    ln_c = math.log(num_classes)
    start = method.training_step(_batch(2), Progress(step=0, epoch=5.0, max_epochs=20, stage_epoch=0.0))
    end = method.training_step(_batch(2), Progress(step=0, epoch=15.0, max_epochs=20, stage_epoch=10.0))
    assert start.logs["uncertainty_threshold"] == pytest.approx((0.75 + 0.25 * math.exp(-5.0)) * ln_c)
    assert start.logs["cons_weight"] == pytest.approx(0.1 * math.exp(-5.0))
    assert end.logs["uncertainty_threshold"] == pytest.approx(ln_c)
    without_rampup = build_method("ua_mean_teacher", tiny_context(num_classes=num_classes), {"mc_passes": 2})
    assert without_rampup.training_step(_batch(2), START).logs["uncertainty_threshold"] == pytest.approx(ln_c)


def _voxels(values: list[list[float]]) -> torch.Tensor:
    """``[1, C, 2, 2]`` probabilities from four voxels' class vectors (row-major)."""
    return torch.tensor(values).T.reshape(1, len(values[0]), 2, 2)


def test_mask_and_normaliser_on_four_voxels_with_two_classes():
    student = _voxels([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4]]).requires_grad_()
    teacher = _voxels([[0.7, 0.3], [0.1, 0.9], [0.4, 0.6], [0.9, 0.1]]).requires_grad_()
    uncertainty = torch.tensor([0.1, 0.6, 0.3, 0.7]).reshape(1, 1, 2, 2)
    mask = certainty_mask(uncertainty, 0.5)
    assert mask.flatten().tolist() == [1.0, 0.0, 1.0, 0.0]
    loss = masked_consistency(student, teacher, mask)
    # kept voxels 0 and 2: (0.2² + 0.2²) + (0.2² + 0.2²) = 0.16, divided by C·Σmask = 2·2
    assert float(loss.detach()) == pytest.approx(0.04)
    loss.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    assert student.grad[0, :, 0, 1].abs().sum() == 0


def test_mask_and_normaliser_on_four_voxels_with_four_classes():
    student = _voxels([[0.7, 0.1, 0.1, 0.1], [0.25] * 4, [0.25] * 4, [1.0, 0.0, 0.0, 0.0]])
    teacher = _voxels([[0.4, 0.2, 0.2, 0.2], [0.25] * 4, [0.55, 0.15, 0.15, 0.15], [0.0, 1.0, 0.0, 0.0]])
    threshold = 0.97 * math.log(4)  # 1.3447
    mask = certainty_mask(predictive_entropy(teacher), threshold)
    # entropies: 1.332 (kept), ln 4 = 1.386 (masked), 1.183 (kept), 0 (kept)
    assert mask.flatten().tolist() == [1.0, 0.0, 1.0, 1.0]
    loss = masked_consistency(student, teacher, mask)
    # (0.09 + 3·0.01) + 0 + (0.09 + 3·0.01) + (1 + 1) = 2.24, divided by C·Σmask = 4·3
    assert float(loss) == pytest.approx(2.24 / 12)
    assert float(masked_consistency(student, teacher, torch.zeros_like(mask))) == 0.0


def test_dropout_is_active_only_inside_the_context_and_batchnorm_stays_in_eval():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout2d(0.5), nn.Conv2d(4, 2, 1))
    model.eval()
    with dropout_active(model):
        assert model[2].training and not model[1].training and not model[0].training
    assert not any(m.training for m in model.modules())


def test_mc_passes_are_stochastic_average_softmax_and_leave_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Dropout2d(0.5), nn.Conv2d(8, 2, 1))
    model.eval()
    running = model[1].running_mean.clone()
    x = torch.randn(1, 1, 8, 8)
    first = mc_teacher_probs(model, x, 1, noise_std=0.0, generator=torch.Generator().manual_seed(0))
    second = mc_teacher_probs(model, x, 1, noise_std=0.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(first, second)
    torch.testing.assert_close(first.sum(dim=1), torch.ones(1, 8, 8))
    assert torch.equal(model[1].running_mean, running) and not model[2].training
    model[2].p = 0.0
    expected = model(x).softmax(dim=1)
    torch.testing.assert_close(mc_teacher_probs(model, x, 3, noise_std=0.0), expected)


@pytest.mark.parametrize("dims,cons_on", [(2, "unlabelled"), (3, "unlabelled"), (2, "all")])
def test_one_step_is_finite_and_its_consistency_trains_the_student_only(dims, cons_on, tiny_context):
    method = build_method("ua_mean_teacher", tiny_context(dims), {"cons_on": cons_on})
    method.train()
    teacher_before = [p.clone() for p in method.frozen["teacher"].parameters()]
    output = method.training_step(_batch(dims), END)
    assert torch.isfinite(output.objectives["main"]) and float(output.logs["loss_cons"]) > 0
    assert output.logs["cons_weight"] == pytest.approx(0.1)
    output.unsupervised.backward()
    grads = [p.grad for p in method.trained["student"].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in method.frozen["teacher"].parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, method.frozen["teacher"].parameters()))
    assert method.eval_model() is method.frozen["teacher"]


def test_consistency_covers_only_the_unlabelled_images_by_default(tiny_context):
    method = build_method("ua_mean_teacher", tiny_context(), {"mc_passes": 2})
    method.train()
    batch = _batch(2)
    del batch["image_u"]
    output = method.training_step(batch, END)
    assert float(output.logs["loss_cons"]) == 0.0 and torch.isfinite(output.objectives["main"])
    method.params = replace(method.params, cons_on="all")
    assert float(method.training_step(batch, END).logs["loss_cons"]) > 0


def test_uncertain_voxels_are_left_out_at_the_start(tiny_context):
    """An untrained network is near-uniform: at 0.75·ln C few voxels are certain, at ln C nearly all."""
    method = build_method("ua_mean_teacher", tiny_context(rampup_epochs=10.0), {"mc_passes": 2})
    method.train()
    start = float(method.training_step(_batch(2), START).logs["certain_fraction"])
    end = float(method.training_step(_batch(2), END).logs["certain_fraction"])
    assert end > 0.9 and start < end


def test_after_step_moves_the_teacher_towards_the_student(tiny_context):
    method = build_method("ua_mean_teacher", tiny_context(), {"ema_decay": 0.5})
    with torch.no_grad():
        for p in method.trained["student"].parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.frozen["teacher"].parameters()]
    method.after_step(Progress(step=100, epoch=1.0, max_epochs=10, stage_epoch=1.0))
    for old, new, student in zip(before, method.frozen["teacher"].parameters(),
                                 method.trained["student"].parameters()):
        torch.testing.assert_close(new, 0.5 * old + 0.5 * student)
