"""Hung et al. (BMVC 2018): per-pixel discriminator, its BCE objectives, the confidence mask,
the self-training switch-on and what each objective trains."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.components.discriminator import PixelDiscriminator
from semiseg.methods import Progress, build_method
from tests.methods.stubs import FixedLogits, bce, square_batch
from semiseg.methods.confidence_self_training import confidence_mask, masked_self_training_loss

SPATIAL = {2: (16, 16), 3: (8, 16, 16)}
SMALL = {"disc_width": 4, "disc_depth": 2}
LABELLED_SCORES = [2.0, -1.0]
UNLABELLED_SCORES = [0.5, -3.0, 1.0]  # confidences 0.62, 0.047, 0.73: images 0 and 2 pass T = 0.2
GROUND_TRUTH_SCORES = [1.5, -0.5]


def _batch(dims: int, n_labelled: int = 2, n_unlabelled: int = 3) -> dict[str, torch.Tensor]:
    return square_batch(SPATIAL[dims], n_labelled, n_unlabelled)


def _progress(stage_epoch: float) -> Progress:
    return Progress(step=0, epoch=stage_epoch, max_epochs=30, stage_epoch=stage_epoch)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class _FixedScores(nn.Module):
    """A stand-in discriminator: one constant logit per image, at the requested output size.

    Batches of 5 (the segmenter's predictions) get the labelled then unlabelled scores; batches
    of 2 (one-hot ground truth) the ground-truth scores. Records its inputs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(()))
        self.inputs: list[torch.Tensor] = []

    def forward(self, maps: torch.Tensor, output_size: tuple[int, ...] | None = None) -> torch.Tensor:
        self.inputs.append(maps.detach().clone())
        values = LABELLED_SCORES + UNLABELLED_SCORES if maps.shape[0] == 5 else GROUND_TRUTH_SCORES
        scores = torch.tensor(values).view(-1, *([1] * (maps.ndim - 1)))
        return scores.expand(maps.shape[0], 1, *output_size) + self.offset + 0.0 * maps.sum()


def _stubbed(tiny_context, params: dict | None = None):
    method = build_method("confidence_self_training", tiny_context(2), {**SMALL, **(params or {})})
    logits = torch.randn((5, 2, 16, 16), generator=torch.Generator().manual_seed(4))
    method.trained["student"] = FixedLogits(logits)
    method.trained["discriminator"] = _FixedScores()
    return method, logits


@pytest.mark.parametrize(("dims", "spatial"), [(2, (16, 16)), (2, (20, 12)), (3, (8, 16, 16)), (3, (5, 6, 7))])
def test_discriminator_confidence_map_has_the_input_spatial_shape(dims, spatial):
    discriminator = PixelDiscriminator(dims=dims, in_channels=3, width=4, depth=4)
    maps = torch.rand(2, 3, *spatial)
    assert discriminator(maps, output_size=spatial).shape == (2, 1, *spatial)
    assert discriminator(maps).shape[2:] != spatial


def test_confidence_mask_keeps_pixels_strictly_above_threshold():
    confidence = torch.tensor([0.1, 0.2, 0.2001, 0.9])
    assert confidence_mask(confidence, 0.2).tolist() == [False, False, True, True]
    assert confidence_mask(confidence, 0.05).all()


def test_self_training_loss_is_cross_entropy_to_own_argmax_on_masked_pixels():
    logits = torch.tensor([[[2.0, 0.0, -1.0]], [[0.0, 1.0, 3.0]]])[None].requires_grad_()  # [1, 2, 1, 3]
    mask = torch.tensor([[[True, False, True]]])
    first = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
    third = -math.log(math.exp(3.0) / (math.exp(3.0) + math.exp(-1.0)))
    loss = masked_self_training_loss(logits, mask)
    assert float(loss.detach()) == pytest.approx((first + third) / 2, rel=1e-6)
    (gradient,) = torch.autograd.grad(loss, logits)
    assert gradient[..., 1].abs().sum() == 0 and gradient[..., 0].abs().sum() > 0 and gradient[..., 2].abs().sum() > 0
    empty = masked_self_training_loss(logits, torch.zeros_like(mask))
    assert float(empty.detach()) == 0.0
    empty.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_objectives_against_hand_computations_before_self_training(tiny_context):
    params = {"adversarial_weight": 0.3, "adversarial_weight_unlabelled": 0.2, "semi_start_epoch": 5.0}
    method, logits = _stubbed(tiny_context, params)
    output = method.training_step(_batch(2), _progress(4.0))
    adv_l = _mean([bce(v, 1.0) for v in LABELLED_SCORES])
    adv_u = _mean([bce(v, 1.0) for v in UNLABELLED_SCORES])
    disc = 0.5 * (_mean([bce(v, 1.0) for v in GROUND_TRUTH_SCORES])
                  + _mean([bce(v, 0.0) for v in LABELLED_SCORES + UNLABELLED_SCORES]))
    assert float(output.logs["loss_adv"]) == pytest.approx(adv_l, rel=1e-6)
    assert float(output.logs["loss_adv_u"]) == pytest.approx(adv_u, rel=1e-6)
    assert float(output.objectives["discriminator"].detach()) == pytest.approx(disc, rel=1e-6)
    assert float(output.logs["loss_semi"]) == 0.0
    assert float(output.unsupervised.detach()) == pytest.approx(adv_u, rel=1e-6)
    expected_main = float(output.logs["loss_sup"]) + 0.3 * adv_l + 0.2 * adv_u
    assert float(output.objectives["main"].detach()) == pytest.approx(expected_main, rel=1e-6)
    assert float(output.logs["semi_ratio"]) == pytest.approx(2 / 3)


def test_discriminator_reads_softmax_predictions_and_one_hot_labels(tiny_context):
    method, logits = _stubbed(tiny_context)
    method.training_step(_batch(2), _progress(0.0))
    stub = method.trained["discriminator"]
    predictions = [x for x in stub.inputs if x.shape[0] == 5]
    ground_truth = [x for x in stub.inputs if x.shape[0] == 2]
    assert len(predictions) == 2 and len(ground_truth) == 1
    for maps in predictions:
        torch.testing.assert_close(maps, logits.softmax(dim=1))
    one_hot = ground_truth[0]
    assert one_hot.shape == (2, 2, 16, 16)
    assert set(one_hot.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(one_hot.sum(dim=1), torch.ones(2, 16, 16))


def test_self_training_switches_on_at_semi_start_epoch(tiny_context):
    params = {"adversarial_weight": 0.3, "adversarial_weight_unlabelled": 0.2, "semi_weight": 0.5,
              "semi_start_epoch": 5.0}
    method, logits = _stubbed(tiny_context, params)
    before = method.training_step(_batch(2), _progress(4.99))
    at = method.training_step(_batch(2), _progress(5.0))
    unlabelled = logits[2:]
    per_pixel = F.cross_entropy(unlabelled, unlabelled.argmax(dim=1), reduction="none")
    expected_semi = float(per_pixel[[0, 2]].mean())  # images whose confidence passes T = 0.2
    assert float(before.logs["loss_semi"]) == 0.0
    assert before.logs["cons_weight"] == 0.0
    assert float(at.logs["loss_semi"]) == pytest.approx(expected_semi, rel=1e-6)
    assert at.logs["cons_weight"] == pytest.approx(0.5)
    for output, semi in ((before, 0.0), (at, expected_semi)):
        expected_main = (float(output.logs["loss_sup"]) + 0.3 * float(output.logs["loss_adv"])
                         + 0.2 * float(output.logs["loss_adv_u"]) + 0.5 * semi)
        assert float(output.objectives["main"].detach()) == pytest.approx(expected_main, rel=1e-6)
    adv_u = float(at.logs["loss_adv_u"])
    assert float(at.unsupervised.detach()) == pytest.approx(adv_u + expected_semi, rel=1e-6)


def test_default_semi_start_is_a_quarter_of_the_default_run(tiny_context):
    method = build_method("confidence_self_training", tiny_context(2), SMALL)
    assert method.params.semi_start_epoch == 7.5
    assert not method.semi_active(_progress(7.4))
    assert method.semi_active(_progress(7.5))
    assert (method.params.adversarial_weight, method.params.semi_weight,
            method.params.confidence_threshold) == (0.01, 0.1, 0.2)


@pytest.mark.parametrize("dims", [2, 3])
def test_each_objective_trains_only_its_own_network(dims, tiny_context):
    method = build_method("confidence_self_training", tiny_context(dims), {**SMALL, "semi_start_epoch": 5.0})
    method.train()
    output = method.training_step(_batch(dims, n_unlabelled=2), _progress(1.0))
    assert float(output.logs["loss_semi"]) == 0.0  # the unsupervised term is the adversarial one alone
    segmenter = list(method.trained["student"].parameters())
    critic = list(method.trained["discriminator"].parameters())
    disc = output.objectives["discriminator"]
    assert all(g is None for g in torch.autograd.grad(disc, segmenter, retain_graph=True, allow_unused=True))
    assert any(g is not None and float(g.abs().sum()) > 0
               for g in torch.autograd.grad(disc, critic, retain_graph=True, allow_unused=True))
    through_critic = torch.autograd.grad(output.unsupervised, segmenter + critic, retain_graph=True, allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in through_critic[:len(segmenter)])
    assert all(g is not None for g in through_critic[len(segmenter):])
    output.objectives["main"].backward(inputs=segmenter, retain_graph=True)
    assert all(p.grad is None for p in critic)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in segmenter)


def test_self_training_term_gives_no_gradient_to_the_discriminator(tiny_context):
    params = {**SMALL, "semi_start_epoch": 0.0, "confidence_threshold": 0.0, "adversarial_weight": 0.0,
              "adversarial_weight_unlabelled": 0.0}
    method = build_method("confidence_self_training", tiny_context(2), params)
    output = method.training_step(_batch(2), _progress(1.0))
    assert float(output.logs["loss_semi"]) > 0 and output.logs["cons_weight"] > 0
    critic = list(method.trained["discriminator"].parameters())
    grads = torch.autograd.grad(output.objectives["main"], critic, retain_graph=True, allow_unused=True)
    assert all(g is None or float(g.abs().sum()) == 0 for g in grads)


def test_groups_and_discriminator_learning_rate(tiny_context):
    method = build_method("confidence_self_training", tiny_context(2), {**SMALL, "disc_lr": 2e-4})
    groups = method.optimizer_groups()
    assert {id(p) for p in groups["main"]} == {id(p) for p in method.trained["student"].parameters()}
    assert {id(p) for p in groups["discriminator"]} == {id(p) for p in method.trained["discriminator"].parameters()}
    assert method.group_learning_rates() == {"discriminator": 2e-4}
    assert build_method("confidence_self_training", tiny_context(2), SMALL).group_learning_rates() == {
        "discriminator": 1e-4}


def test_without_unlabelled_images_adversarial_training_remains(tiny_context):
    method, _ = _stubbed(tiny_context, {"adversarial_weight": 0.3})
    batch = _batch(2)
    del batch["image_u"]
    method.trained["discriminator"] = _FixedScoresLabelledOnly()
    output = method.training_step(batch, _progress(10.0))
    assert set(output.objectives) == {"main", "discriminator"}
    assert output.unsupervised is None
    expected_main = float(output.logs["loss_sup"]) + 0.3 * bce(2.0, 1.0)
    assert float(output.objectives["main"].detach()) == pytest.approx(expected_main, rel=1e-6)
    assert float(output.objectives["discriminator"].detach()) == pytest.approx(0.5 * (bce(2.0, 1.0) + bce(2.0, 0.0)))


class _FixedScoresLabelledOnly(nn.Module):
    """A stand-in discriminator scoring every map 2.0."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(()))

    def forward(self, maps: torch.Tensor, output_size: tuple[int, ...] | None = None) -> torch.Tensor:
        return torch.full((maps.shape[0], 1, *output_size), 2.0) + self.offset + 0.0 * maps.sum()
