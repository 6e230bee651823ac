"""Entropy minimisation (Grandvalet & Bengio 2005) and ADVENT (Vu et al. 2019): entropy values,
self-information maps, the adversarial objectives and what each one trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.components.discriminator import PixelDiscriminator
from semiseg.components.entropy import mean_entropy, pixel_entropy, self_information
from semiseg.methods import Progress, build_method
from tests.methods.stubs import FixedLogits, bce, square_batch

SPATIAL = {2: (16, 16), 3: (8, 16, 16)}
ADVERSARIAL = {"adversarial": True, "disc_width": 4, "disc_depth": 2}


def _batch(dims: int, n_labelled: int = 2, n_unlabelled: int = 2) -> dict[str, torch.Tensor]:
    return square_batch(SPATIAL[dims], n_labelled, n_unlabelled)


def _progress(stage_epoch: float = 0.0) -> Progress:
    return Progress(step=0, epoch=stage_epoch, max_epochs=10, stage_epoch=stage_epoch)


def _entropy(probs: list[float]) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


class _FixedScores(nn.Module):
    """A stand-in discriminator: logit 1.5 everywhere for batches of 2, −0.5 for batches of 3; records inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(()))
        self.inputs: list[torch.Tensor] = []

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        self.inputs.append(maps.detach().clone())
        value = 1.5 if maps.shape[0] == 2 else -0.5
        return torch.full((maps.shape[0], 1, 3, 3), value) + self.offset + 0.0 * maps.sum()


def test_entropy_of_uniform_two_classes_is_log2_or_one_normalised():
    logits = torch.zeros(1, 2, 3, 3)
    assert float(mean_entropy(logits, normalise=False)) == pytest.approx(math.log(2))
    assert float(mean_entropy(logits)) == pytest.approx(1.0)


def test_entropy_of_a_given_probability_map_by_hand():
    probs = torch.tensor([[[0.25, 0.9]], [[0.75, 0.1]]])[None]  # [1, 2 classes, 1, 2 pixels]
    logits = probs.log()
    first, second = _entropy([0.25, 0.75]), _entropy([0.9, 0.1])
    torch.testing.assert_close(pixel_entropy(logits, normalise=False), torch.tensor([[[first, second]]]))
    assert float(mean_entropy(logits)) == pytest.approx((first + second) / 2 / math.log(2), rel=1e-6)
    three = torch.tensor([0.5, 0.3, 0.2]).log().view(1, 3, 1)
    assert float(mean_entropy(three)) == pytest.approx(_entropy([0.5, 0.3, 0.2]) / math.log(3), rel=1e-6)


def test_self_information_map_is_minus_p_log_p_over_log_c_per_class():
    probs = torch.tensor([0.25, 0.75]).view(1, 2, 1, 1)
    information = self_information(probs.log())
    assert information.shape == (1, 2, 1, 1)
    assert float(information[0, 0]) == pytest.approx(0.5, rel=1e-6)  # 0.25·ln 4 / ln 2
    assert float(information[0, 1]) == pytest.approx(-0.75 * math.log(0.75) / math.log(2), rel=1e-6)
    assert float(self_information(probs.log(), normalise=False)[0, 0]) == pytest.approx(0.25 * math.log(4))


def test_entropy_gradient_stays_finite_for_saturated_predictions():
    logits = torch.tensor([[200.0, -200.0], [0.0, 0.0]]).T.reshape(1, 2, 2, 1).requires_grad_()
    mean_entropy(logits).backward()
    assert torch.isfinite(logits.grad).all()


def test_normalised_entropy_needs_two_classes():
    with pytest.raises(ValueError, match="2 classes"):
        mean_entropy(torch.zeros(1, 1, 2, 2))


def test_discriminator_has_advents_architecture_at_paper_size():
    discriminator = PixelDiscriminator(dims=2, in_channels=3)
    convs = list(discriminator.convs)
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    assert discriminator(torch.rand(2, 3, 64, 64)).shape == (2, 1, 2, 2)


def test_discriminator_is_convolutions_with_leaky_relu_0_2():
    torch.manual_seed(0)
    discriminator = PixelDiscriminator(dims=2, in_channels=2, width=3, depth=2)
    maps = torch.randn(1, 2, 16, 16)
    first, second, last = discriminator.convs
    expected = last(F.leaky_relu(second(F.leaky_relu(first(maps), 0.2)), 0.2))
    torch.testing.assert_close(discriminator(maps), expected)


@pytest.mark.parametrize(("dims", "spatial"), [(2, (16, 16)), (3, (8, 16, 16)), (3, (1, 3, 2))])
def test_discriminator_keeps_at_least_one_voxel_on_tiny_patches(dims, spatial):
    discriminator = PixelDiscriminator(dims=dims, in_channels=2, width=4, depth=4)
    logits = discriminator(torch.rand(2, 2, *spatial))
    assert logits.shape[:2] == (2, 1) and logits.ndim == dims + 2
    assert all(s >= 1 for s in logits.shape[2:])
    assert torch.isfinite(logits).all()


def test_direct_form_builds_no_discriminator(tiny_context):
    method = build_method("entropy_minimisation", tiny_context(2), {})
    assert set(method.trained) == {"student"}
    assert set(method.optimizer_groups()) == {"main"}
    assert method.group_learning_rates() == {}


def test_direct_form_main_is_supervised_plus_ramped_entropy(tiny_context):
    method = build_method("entropy_minimisation", tiny_context(2, rampup_epochs=10.0),
                          {"entropy_weight": 0.5})
    logits = torch.randn((4, 2, 16, 16), generator=torch.Generator().manual_seed(3))
    method.trained["student"] = FixedLogits(logits)
    output = method.training_step(_batch(2), _progress(stage_epoch=5.0))
    ramp = math.exp(-5 * 0.5 ** 2)
    assert output.logs["cons_weight"] == pytest.approx(0.5 * ramp)
    probs = logits[2:].softmax(dim=1)
    expected_entropy = float((-(probs * probs.log()).sum(dim=1) / math.log(2)).mean())
    assert float(output.unsupervised.detach()) == pytest.approx(expected_entropy, rel=1e-6)
    expected_main = float(output.logs["loss_sup"]) + 0.5 * ramp * expected_entropy
    assert float(output.objectives["main"].detach()) == pytest.approx(expected_main, rel=1e-6)
    assert set(output.objectives) == {"main"}


@pytest.mark.parametrize("dims", [2, 3])
def test_direct_entropy_term_trains_the_segmenter(dims, tiny_context):
    method = build_method("entropy_minimisation", tiny_context(dims), {})
    method.train()
    output = method.training_step(_batch(dims), _progress())
    grads = torch.autograd.grad(output.unsupervised, list(method.trained["student"].parameters()), allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_adversarial_objectives_use_advents_labels(tiny_context):
    method = build_method("entropy_minimisation", tiny_context(2), {**ADVERSARIAL, "adversarial_weight": 0.25})
    logits = torch.randn((5, 2, 16, 16), generator=torch.Generator().manual_seed(4))
    method.trained["student"] = FixedLogits(logits)
    stub = _FixedScores()
    method.trained["discriminator"] = stub
    output = method.training_step(_batch(2, n_labelled=2, n_unlabelled=3), _progress())
    assert float(output.logs["loss_adv"]) == pytest.approx(bce(-0.5, 0.0))  # unlabelled made to look labelled (0)
    assert float(output.objectives["discriminator"].detach()) == pytest.approx(0.5 * (bce(1.5, 0.0) + bce(-0.5, 1.0)))
    expected_main = float(output.logs["loss_sup"]) + 0.25 * bce(-0.5, 0.0)
    assert float(output.objectives["main"].detach()) == pytest.approx(expected_main, rel=1e-6)
    probs = logits.softmax(dim=1)
    expected_maps = -probs * probs.log() / math.log(2)
    seen_unlabelled = [x for x in stub.inputs if x.shape[0] == 3]
    seen_labelled = [x for x in stub.inputs if x.shape[0] == 2]
    assert seen_unlabelled and seen_labelled
    for maps in seen_unlabelled:
        torch.testing.assert_close(maps, expected_maps[2:])
    torch.testing.assert_close(seen_labelled[0], expected_maps[:2])


@pytest.mark.parametrize("dims", [2, 3])
def test_adversarial_gradients_reach_only_their_own_networks(dims, tiny_context):
    method = build_method("entropy_minimisation", tiny_context(dims), ADVERSARIAL)
    method.train()
    output = method.training_step(_batch(dims), _progress())
    segmenter = list(method.trained["student"].parameters())
    critic = list(method.trained["discriminator"].parameters())
    disc = output.objectives["discriminator"]
    assert all(g is None for g in torch.autograd.grad(disc, segmenter, retain_graph=True, allow_unused=True))
    assert any(g is not None and float(g.abs().sum()) > 0
               for g in torch.autograd.grad(disc, critic, retain_graph=True, allow_unused=True))
    through_critic = torch.autograd.grad(output.unsupervised, segmenter + critic, retain_graph=True,
                                         allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in through_critic[:len(segmenter)])
    assert all(g is not None for g in through_critic[len(segmenter):])
    output.objectives["main"].backward(inputs=segmenter, retain_graph=True)
    assert all(p.grad is None for p in critic)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in segmenter)


def test_adversarial_groups_and_discriminator_learning_rate(tiny_context):
    method = build_method("entropy_minimisation", tiny_context(2), {**ADVERSARIAL, "disc_lr": 3e-4})
    groups = method.optimizer_groups()
    assert set(groups) == {"main", "discriminator"}
    assert {id(p) for p in groups["main"]} == {id(p) for p in method.trained["student"].parameters()}
    assert {id(p) for p in groups["discriminator"]} == {id(p) for p in method.trained["discriminator"].parameters()}
    assert method.group_learning_rates() == {"discriminator": 3e-4}
    assert build_method("entropy_minimisation", tiny_context(2), {"adversarial": True}).group_learning_rates() == {
        "discriminator": 1e-4}


@pytest.mark.parametrize("params", [{}, ADVERSARIAL])
def test_without_unlabelled_images_only_the_supervised_loss_remains(params, tiny_context):
    method = build_method("entropy_minimisation", tiny_context(2), params)
    batch = _batch(2)
    del batch["image_u"]
    output = method.training_step(batch, _progress())
    assert set(output.objectives) == {"main"}
    assert float(output.objectives["main"].detach()) == pytest.approx(float(output.logs["loss_sup"]))


@pytest.mark.parametrize("dims", [2, 3])
def test_adversarial_form_state_round_trips(dims, tiny_context):
    source = build_method("entropy_minimisation", tiny_context(dims, seed=0), ADVERSARIAL)
    target = build_method("entropy_minimisation", tiny_context(dims, seed=1), ADVERSARIAL)
    output = source.training_step(_batch(dims), _progress())
    assert set(output.objectives) == set(source.optimizer_groups()) == {"main", "discriminator"}
    assert all(torch.isfinite(value) for value in output.objectives.values())
    target.load_state_dict(source.state_dict())
    for key in ("student", "discriminator"):
        for a, b in zip(source.trained[key].state_dict().values(), target.trained[key].state_dict().values()):
            torch.testing.assert_close(a, b)
    assert source.eval_model() is source.trained["student"]
    images = _batch(dims)["image_l"]
    with torch.no_grad():
        torch.testing.assert_close(source.eval_model().eval()(images), target.eval_model().eval()(images))
