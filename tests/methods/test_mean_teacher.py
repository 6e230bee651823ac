"""Mean teacher specifics (Perone & Cohen-Adad 2018)."""

import torch

from semiseg.augment import AugmentSettings
from semiseg.methods import Progress, build_method


def _method(tiny_context, **params):
    return build_method("mean_teacher", tiny_context(dropout=0.0), params)


def _batch():
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, 4:12, 4:12] = 1
    return {"image_l": labels[:, None].float() + 0.1 * torch.randn(2, 1, 16, 16, generator=gen),
            "label_l": labels, "image_u": torch.randn(2, 1, 16, 16, generator=gen)}


def test_teacher_gets_no_gradient_and_student_does(tiny_context):
    method = _method(tiny_context)
    method.train()
    output = method.training_step(_batch(), Progress(step=0, epoch=0.0, max_epochs=1))
    output.objectives["main"].backward()
    assert all(p.grad is not None for p in method.trained["student"].parameters())
    assert all(p.grad is None for p in method.frozen["teacher"].parameters())
    assert output.logs["cons_weight"] == 1.0


def test_eval_model_is_the_teacher_and_after_step_moves_it_towards_the_student(tiny_context):
    method = _method(tiny_context, ema_decay=0.5)
    assert method.eval_model() is method.frozen["teacher"]
    with torch.no_grad():
        for p in method.trained["student"].parameters():
            p.add_(1.0)
    teacher_before = [p.clone() for p in method.frozen["teacher"].parameters()]
    method.after_step(Progress(step=1000, epoch=5.0, max_epochs=10))
    for before, after, student in zip(teacher_before, method.frozen["teacher"].parameters(),
                                      method.trained["student"].parameters()):
        torch.testing.assert_close(after, 0.5 * before + 0.5 * student)


def test_begin_semi_supervised_copies_the_pretrained_student(tiny_context):
    method = _method(tiny_context)
    with torch.no_grad():
        for p in method.trained["student"].parameters():
            p.mul_(-2.0)
    method.begin_semi_supervised()
    for t, s in zip(method.frozen["teacher"].parameters(), method.trained["student"].parameters()):
        assert torch.equal(t, s)


def test_consistency_is_zero_for_a_student_equal_to_its_teacher_without_perturbation(tiny_context):
    """Sanity of the alignment: no augmentation, no noise, no dropout -> zero consistency."""
    context = tiny_context(dropout=0.0,
                           augment=AugmentSettings(rotation_deg=0, scale=0, shift=0, noise_std=0, intensity=0))
    method = build_method("mean_teacher", context, {"teacher_noise_std": 0.0})
    method.trained["student"].eval()
    output = method.training_step(_batch(), Progress(step=0, epoch=0.0, max_epochs=1))
    assert float(output.unsupervised.detach()) < 1e-10
