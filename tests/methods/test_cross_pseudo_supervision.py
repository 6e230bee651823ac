"""Cross pseudo supervision (Chen et al. 2021): cross terms, detachment, sample selection, ALW, one step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import semiseg.methods.cross_pseudo_supervision as cps_module
from semiseg.augment import AugmentSettings
from semiseg.components.lovasz import lovasz_softmax
from semiseg.components.pseudo_labels import cross_pseudo_supervision_loss, hard_pseudo_labels, pseudo_label_loss
from semiseg.losses import soft_dice_loss
from semiseg.methods import Progress, build_method

STEP = Progress(step=0, epoch=0.0, max_epochs=1)
NO_AUGMENT = AugmentSettings(rotation_deg=0.0, scale=0.0, shift=0.0, noise_std=0.0, intensity=0.0)


def _batch(dims: int, unlabelled: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    spatial = (16, 16) if dims == 2 else (8, 16, 16)
    labels = torch.zeros((2, *spatial), dtype=torch.long)
    labels[(slice(None),) + (slice(3, -3),) * dims] = 1
    return {"image_l": labels[:, None].float() + 0.1 * torch.randn((2, 1, *spatial), generator=gen),
            "label_l": labels, "image_u": torch.randn((unlabelled, 1, *spatial), generator=gen)}


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def test_cross_terms_are_each_networks_ce_on_the_others_argmax():
    logits1, logits2 = _logits(0), _logits(1)
    expected = F.cross_entropy(logits1, logits2.argmax(dim=1)) + F.cross_entropy(logits2, logits1.argmax(dim=1))
    torch.testing.assert_close(cross_pseudo_supervision_loss(logits1, logits2), expected)
    assert not torch.equal(logits1.argmax(dim=1), logits2.argmax(dim=1))


def test_pseudo_labels_are_detached_so_each_cross_term_trains_one_network():
    logits1, logits2 = _logits(0), _logits(1)
    cross_pseudo_supervision_loss(logits1, logits2).backward()
    alone1, alone2 = _logits(0), _logits(1)
    F.cross_entropy(alone1, alone2.detach().argmax(dim=1)).backward()
    F.cross_entropy(alone2, alone1.detach().argmax(dim=1)).backward()
    torch.testing.assert_close(logits1.grad, alone1.grad)
    torch.testing.assert_close(logits2.grad, alone2.grad)
    assert logits1.grad.abs().sum() > 0 and logits2.grad.abs().sum() > 0
    assert not hard_pseudo_labels(logits1).requires_grad


def test_lovasz_pseudo_loss_adds_the_lovasz_softmax_to_the_cross_entropy():
    logits, targets = _logits(0), _logits(1).argmax(dim=1)
    expected = F.cross_entropy(logits, targets) + lovasz_softmax(logits.softmax(dim=1), targets)
    torch.testing.assert_close(pseudo_label_loss(logits, targets, "lovasz"), expected)
    with pytest.raises(ValueError):
        pseudo_label_loss(logits, targets, "dice")


@pytest.mark.parametrize("cps_on,expected_start", [("unlabelled", 2), ("all", 0)])
def test_cps_on_selects_the_unlabelled_or_all_samples(monkeypatch, cps_on, expected_start, tiny_context):
    method = build_method("cross_pseudo_supervision", tiny_context(augment=NO_AUGMENT), {"cps_on": cps_on})
    method.trained["net1"], method.trained["net2"] = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1)
    seen = {}

    def spy(logits1, logits2, name):
        seen["logits1"], seen["logits2"] = logits1, logits2
        return cross_pseudo_supervision_loss(logits1, logits2, name)

    monkeypatch.setattr(cps_module, "cross_pseudo_supervision_loss", spy)
    batch = _batch(2, unlabelled=3)
    method.training_step(batch, STEP)
    images = torch.cat([batch["image_l"], batch["image_u"]])[expected_start:]
    with torch.no_grad():
        torch.testing.assert_close(seen["logits1"], method.trained["net1"](images))
        torch.testing.assert_close(seen["logits2"], method.trained["net2"](images))


def test_adaptive_weight_is_the_previous_epochs_mean_dice_and_survives_a_round_trip(tiny_context):
    context = tiny_context(augment=NO_AUGMENT)
    method = build_method("cross_pseudo_supervision", context, {"adaptive_weight": True})
    method.train()
    batch = _batch(2)
    dices = []
    for _ in range(2):
        output = method.training_step(batch, STEP)
        dices.append(float(output.logs["dice_sup"]))
        assert output.logs["cons_weight"] == pytest.approx(1.5 * dices[-1])
    assert 0.0 < dices[0] < 1.0
    method.end_epoch(0, {"dice_sup": sum(dices) / 2, "loss_sup": 1.0})
    assert method.training_step(batch, STEP).logs["cons_weight"] == pytest.approx(1.5 * sum(dices) / 2)
    method.end_epoch(1, {"loss_sup": 1.0})
    assert method.adaptive_factor(0.9) == pytest.approx(sum(dices) / 2)
    restored = build_method("cross_pseudo_supervision", context, {"adaptive_weight": True})
    restored.load_state_dict(method.state_dict())
    assert restored.adaptive_factor(0.9) == pytest.approx(sum(dices) / 2)
    assert restored.training_step(batch, STEP).logs["cons_weight"] == pytest.approx(1.5 * sum(dices) / 2)


def test_logged_dice_is_one_minus_the_soft_dice_loss_of_both_networks(tiny_context):
    method = build_method("cross_pseudo_supervision", tiny_context(augment=NO_AUGMENT), {})
    method.trained["net1"], method.trained["net2"] = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 1)
    batch = _batch(2)
    output = method.training_step(batch, STEP)
    with torch.no_grad():
        losses = [soft_dice_loss(method.trained[key](batch["image_l"]), batch["label_l"]) for key in ("net1", "net2")]
    assert float(output.logs["dice_sup"]) == pytest.approx(1.0 - float(sum(losses)) / 2, abs=1e-6)
    assert output.logs["cons_weight"] == pytest.approx(1.5)


@pytest.mark.parametrize("dims,pseudo_loss", [(2, "ce"), (3, "ce"), (2, "lovasz")])
def test_one_step_is_finite_and_the_cps_term_trains_both_networks(dims, pseudo_loss, tiny_context):
    method = build_method("cross_pseudo_supervision", tiny_context(dims), {"pseudo_loss": pseudo_loss})
    method.train()
    assert method.segmenters == ("net1", "net2") and method.eval_model() is method.trained["net1"]
    assert not torch.equal(next(method.trained["net1"].parameters()), next(method.trained["net2"].parameters()))
    output = method.training_step(_batch(dims), STEP)
    assert torch.isfinite(output.objectives["main"]) and float(output.logs["loss_cons"]) > 0
    output.unsupervised.backward()
    for key in ("net1", "net2"):
        grads = [p.grad for p in method.trained[key].parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), key
        assert sum(float(g.abs().sum()) for g in grads) > 0, key
