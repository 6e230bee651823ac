"""``train.supervised_loss``: every choice against its direct formula, chosen by configuration for every method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from semiseg.config import SUPERVISED_LOSSES, ConfigError
from semiseg.losses import supervised_loss
from semiseg.methods.registry import experiment_config


def _two_voxel_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Two voxels, two classes: voxel 0 of class 1 predicted with p = 0.8, voxel 1 of class 0 with p = 0.6."""
    probs = torch.tensor([[[0.2, 0.6], [0.8, 0.4]]])
    return probs.log(), torch.tensor([[1, 0]])


def test_each_supervised_loss_equals_its_hand_computed_value():
    logits, labels = _two_voxel_case()
    ce = -(math.log(0.8) + math.log(0.6)) / 2
    dice_foreground = (2 * 0.8 + 1e-5) / (0.8 + 0.4 + 1 + 1e-5)
    # Lovász: per class, errors m = |1(y = c) − p_c| sorted in decreasing order, weighted by the steps of
    # Δ_J(S) = |S| / |{y = c} ∪ S|. Class 0 ({voxel 1}): m = 0.4 (voxel 1), 0.2 (voxel 0); Δ_J = 1/1, 2/2.
    lovasz_class0 = 0.4 * (1 / 1) + 0.2 * (2 / 2 - 1 / 1)
    # Class 1 ({voxel 0}): m = 0.4 (voxel 1), 0.2 (voxel 0); Δ_J = 1/2, 2/2.
    lovasz_class1 = 0.4 * (1 / 2) + 0.2 * (2 / 2 - 1 / 2)
    lovasz = (lovasz_class0 + lovasz_class1) / 2
    expected = {"ce": ce, "dice": 1 - dice_foreground, "dice_ce": 1 - dice_foreground + ce, "lovasz": lovasz,
                "dice_ce+lovasz": 1 - dice_foreground + ce + lovasz}
    assert set(expected) == set(SUPERVISED_LOSSES)
    for name, value in expected.items():
        assert float(supervised_loss(name, logits, labels)) == pytest.approx(value, rel=1e-5), name


def test_ce_matches_torch_and_lovasz_is_zero_for_a_perfect_prediction():
    logits = torch.randn(2, 3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    labels = logits.argmax(dim=1)
    assert float(supervised_loss("ce", logits, labels)) == pytest.approx(float(F.cross_entropy(logits, labels)))
    sharp = F.one_hot(labels, 3).movedim(-1, 1).float() * 50.0
    assert float(supervised_loss("lovasz", sharp, labels)) == pytest.approx(0.0, abs=1e-6)


def test_the_configuration_chooses_the_loss_for_every_method_and_refuses_others():
    cfg = experiment_config({"train.supervised_loss": "dice_ce+lovasz", "method.name": "mean_teacher"})
    assert cfg.train.supervised_loss == "dice_ce+lovasz"
    with pytest.raises(ConfigError, match="train.supervised_loss"):
        experiment_config({"train.supervised_loss": "focal"})


def test_the_training_context_carries_the_configured_loss(tiny_config):
    from semiseg.train.build import build_context, prepare_data

    cfg = experiment_config({**tiny_config, "train.supervised_loss": "lovasz"})
    context = build_context(cfg, prepare_data(cfg), torch.device("cpu"))
    assert context.supervised_loss == "lovasz"
