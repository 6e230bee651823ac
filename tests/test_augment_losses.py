"""Augmentation alignment and the losses."""

import math

import pytest
import torch

from semiseg.augment import AugmentSettings, identity_affine, sample_affine, valid_mask, warp, warp_labels
from semiseg.losses import consistency_loss, one_hot, soft_dice_loss, supervised_loss, symmetric_kl_divergence


@pytest.mark.parametrize("dims", [2, 3])
def test_warping_probabilities_equals_warping_labels(dims):
    """The mean teacher's trick: transforming the output keeps it aligned with the transformed input."""
    gen = torch.Generator().manual_seed(0)
    shape = (2, 16, 16) if dims == 2 else (2, 8, 16, 16)
    labels = torch.zeros(shape, dtype=torch.long)
    labels[(slice(None),) + tuple(slice(4, 12) for _ in range(dims))] = 1
    theta = sample_affine(2, dims, AugmentSettings(rotation_deg=20, scale=0.1, shift=0.1), gen, shape=shape[1:])
    warped_probs = warp(one_hot(labels, 2), theta)
    mask = valid_mask(warped_probs, theta).squeeze(1).bool()
    agree = (warped_probs.argmax(1) == warp_labels(labels, theta))[mask].float().mean()
    assert agree > 0.97


def test_identity_warp_is_identity():
    x = torch.randn(2, 3, 10, 12)
    torch.testing.assert_close(warp(x, identity_affine(2, 2)), x, atol=1e-5, rtol=0)


def test_dice_loss_perfect_and_wrong():
    labels = torch.tensor([[[0, 1], [1, 0]]])
    perfect = one_hot(labels, 2) * 40 - 20
    assert soft_dice_loss(perfect, labels) == pytest.approx(0.0, abs=1e-4)
    assert soft_dice_loss(-perfect, labels) == pytest.approx(1.0, abs=1e-4)
    assert supervised_loss("dice_ce", perfect, labels) < 1e-3
    with pytest.raises(ValueError, match="supervised loss"):
        supervised_loss("focal", perfect, labels)


def test_consistency_losses_against_direct_formulas():
    student = torch.tensor([[[[0.0]], [[math.log(3.0)]]]])
    p = torch.tensor([0.25, 0.75])
    q = torch.tensor([0.5, 0.5])
    target = q.view(1, 2, 1, 1)
    assert consistency_loss("mse", student, target) == pytest.approx(float(((p - q) ** 2).sum()), abs=1e-6)
    bce = -(q * p.log() + (1 - q) * (1 - p).log()).sum()
    assert consistency_loss("bce", student, target) == pytest.approx(float(bce), abs=1e-5)
    kl = (q * (q / p).log()).sum()
    assert consistency_loss("kl", student, target) == pytest.approx(float(kl), abs=1e-6)
    skl = (p * (p / q).log()).sum() + (q * (q / p).log()).sum()
    assert symmetric_kl_divergence(p.view(1, 2, 1, 1), target) == pytest.approx(float(skl), abs=1e-6)
    assert consistency_loss("symmetric_kl", student, target) == pytest.approx(float(skl), abs=1e-6)


def test_consistency_mask_excludes_voxels():
    student = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[[0.5, 1.0]], [[0.5, 0.0]]]])
    mask = torch.tensor([[[[1.0, 0.0]]]])
    assert consistency_loss("mse", student, target, mask) == pytest.approx(0.0, abs=1e-7)
    assert consistency_loss("mse", student, target) == pytest.approx(0.25, abs=1e-6)
