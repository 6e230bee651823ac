"""Adversarial segmentation (Zhang et al. 2017): discriminator, targets, gradient routing."""

from __future__ import annotations

from dataclasses import replace

import math

import pytest
import torch
from torch import nn

from semiseg.components.discriminator import Discriminator, discriminator_loss, fooling_loss
from semiseg.methods import Progress, build_method

SPATIAL = {2: (16, 16), 3: (8, 16, 16)}
PARAMS = {"disc_width": 4, "disc_depth": 2}


def _batch(dims: int, n_labelled: int = 2, n_unlabelled: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    spatial = SPATIAL[dims]
    labels = torch.zeros((n_labelled, *spatial), dtype=torch.long)
    labels[(slice(None), *(slice(s // 4, 3 * s // 4) for s in spatial))] = 1
    return {"image_l": torch.randn((n_labelled, 1, *spatial), generator=generator),
            "label_l": labels,
            "image_u": torch.randn((n_unlabelled, 1, *spatial), generator=generator)}


def _progress() -> Progress:
    return Progress(step=0, epoch=0.0, max_epochs=1)


def _bce(logit: float, target: float) -> float:
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


class _FixedScores(nn.Module):
    """A stand-in discriminator: logit 1.5 for batches of 2 (labelled), −0.5 for batches of 3."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        value = 1.5 if images.shape[0] == 2 else -0.5
        return torch.full((images.shape[0],), value) + self.offset + 0.0 * probs.flatten(1).sum(1)


def test_discriminator_loss_uses_labelled_as_real_and_unlabelled_as_fake():
    labelled, unlabelled = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0, 1.0])
    expected_real = (_bce(2.0, 1) + _bce(-1.0, 1)) / 2
    expected_fake = (_bce(0.5, 0) + _bce(-3.0, 0) + _bce(1.0, 0)) / 3
    assert float(discriminator_loss(labelled, unlabelled)) == pytest.approx(0.5 * (expected_real + expected_fake))


def test_fooling_loss_targets_real_on_unlabelled():
    unlabelled = torch.tensor([0.5, -3.0])
    assert float(fooling_loss(unlabelled)) == pytest.approx((_bce(0.5, 1) + _bce(-3.0, 1)) / 2)


@pytest.mark.parametrize(("dims", "spatial"), [(2, (16, 15)), (3, (5, 16, 16))])
def test_discriminator_gives_one_logit_per_sample(dims, spatial):
    discriminator = Discriminator(dims=dims, in_channels=1, num_classes=3, width=4, depth=3)
    logits = discriminator(torch.randn(2, 1, *spatial), torch.rand(2, 3, *spatial))
    assert logits.shape == (2,)
    assert torch.isfinite(logits).all()


def test_method_losses_use_the_targets_of_the_paper(tiny_context):
    method = build_method("adversarial", tiny_context(2), {**PARAMS, "adversarial_weight": 0.5})
    method.trained["discriminator"] = _FixedScores()
    output = method.training_step(_batch(2, n_labelled=2, n_unlabelled=3), _progress())
    assert float(output.logs["loss_cons"]) == pytest.approx(_bce(-0.5, 1))
    assert float(output.logs["loss_disc"]) == pytest.approx(0.5 * (_bce(1.5, 1) + _bce(-0.5, 0)))
    expected_main = float(output.logs["loss_sup"]) + 0.5 * _bce(-0.5, 1)
    assert output.objectives["main"].item() == pytest.approx(expected_main, rel=1e-5)


def test_optimizer_groups_partition_the_trained_parameters(tiny_context):
    method = build_method("adversarial", tiny_context(2), PARAMS)
    groups = method.optimizer_groups()
    assert set(groups) == {"main", "discriminator"}
    main, disc = {id(p) for p in groups["main"]}, {id(p) for p in groups["discriminator"]}
    assert not main & disc
    every = {id(p) for module in method.trained.values() for p in module.parameters()}
    assert main | disc == every
    assert main == {id(p) for p in method.trained["student"].parameters()}


@pytest.mark.parametrize("dims", [2, 3])
def test_training_step_routes_each_objective_to_its_own_network(dims, tiny_context):
    method = build_method("adversarial", tiny_context(dims), PARAMS)
    method.train()
    output = method.training_step(_batch(dims), _progress())
    main, disc = output.objectives["main"], output.objectives["discriminator"]
    assert torch.isfinite(main) and torch.isfinite(disc)
    assert float(output.logs["loss_cons"]) > 0
    segmenter = list(method.trained["student"].parameters())
    critic = list(method.trained["discriminator"].parameters())
    from_disc = torch.autograd.grad(disc, segmenter, retain_graph=True, allow_unused=True)
    assert all(g is None for g in from_disc)
    assert any(g is not None and float(g.abs().sum()) > 0
               for g in torch.autograd.grad(disc, critic, retain_graph=True, allow_unused=True))
    main.backward(inputs=segmenter, retain_graph=True)
    assert all(p.grad is None for p in critic)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in segmenter)


def _main_objective(method, batch: dict, weight: float) -> torch.Tensor:
    """The ``main`` objective with a given adversarial weight, with every random draw replayed."""
    method.params = replace(method.params, adversarial_weight=weight)
    method.generator.manual_seed(5)
    torch.manual_seed(5)
    return method.training_step(batch, _progress()).objectives["main"]


def test_adversarial_term_reaches_the_segmenter_through_the_discriminator(tiny_context):
    method = build_method("adversarial", tiny_context(2), PARAMS)
    method.train()
    batch = _batch(2)
    term = _main_objective(method, batch, 1.0) - _main_objective(method, batch, 0.0)
    assert term.item() > 0
    segmenter = list(method.trained["student"].parameters())
    grads = torch.autograd.grad(term, segmenter + list(method.trained["discriminator"].parameters()),
                                allow_unused=True)
    from_term = grads[:len(segmenter)]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in from_term)
    assert all(g is not None for g in grads[len(segmenter):])


def test_without_unlabelled_images_only_the_segmenter_is_trained(tiny_context):
    method = build_method("adversarial", tiny_context(2), PARAMS)
    batch = _batch(2)
    del batch["image_u"]
    output = method.training_step(batch, _progress())
    assert set(output.objectives) == {"main"}
    assert torch.isfinite(output.objectives["main"])


def test_eval_model_is_the_segmenter_and_state_round_trips(tiny_context):
    source = build_method("adversarial", tiny_context(2, seed=0), PARAMS)
    target = build_method("adversarial", tiny_context(2, seed=1), PARAMS)
    assert source.eval_model() is source.trained["student"]
    target.load_state_dict(source.state_dict())
    for key in ("student", "discriminator"):
        for a, b in zip(source.trained[key].state_dict().values(), target.trained[key].state_dict().values()):
            torch.testing.assert_close(a, b)
