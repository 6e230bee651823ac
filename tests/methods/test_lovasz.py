"""Lovász-softmax loss (Berman et al. 2018) against hand-computed values and a brute-force integral."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semiseg.components.lovasz import lovasz_grad, lovasz_softmax
from semiseg.losses import one_hot


def brute_force_lovasz(probs: np.ndarray, labels: np.ndarray, classes: str = "present") -> float:
    """Mean over classes of ∫₀¹ Δ_J({i: m_i ≥ t}) dt, the Lovász extension of the Jaccard loss.

    Δ_J(S) = |S| / |{y = c} ∪ S| and m_i = |𝟙(y_i = c) − p_i^c|; the integral is taken on a
    fine grid of thresholds, independently of the sorting formula.
    """
    flat_probs = np.moveaxis(probs, 1, -1).reshape(-1, probs.shape[1])
    flat_labels = labels.reshape(-1)
    thresholds = np.linspace(0.0, 1.0, 20001)[1:]
    values = []
    for c in range(probs.shape[1]):
        foreground = flat_labels == c
        if classes == "present" and not foreground.any():
            continue
        errors = np.abs(foreground.astype(float) - flat_probs[:, c])
        selected = errors[None, :] >= thresholds[:, None]
        union = (selected | foreground[None, :]).sum(axis=1)
        jaccard_loss = np.where(union > 0, selected.sum(axis=1) / np.maximum(union, 1), 0.0)
        values.append(jaccard_loss.mean())
    return float(np.mean(values))


@pytest.mark.parametrize("shape", [(2, 8, 8), (2, 4, 6, 6)])
def test_perfect_prediction_gives_zero(shape):
    labels = torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(0))
    assert float(lovasz_softmax(one_hot(labels, 3), labels)) == pytest.approx(0.0, abs=1e-7)


def test_hard_prediction_gives_one_minus_mean_iou():
    """Binary, four pixels, one foreground pixel predicted background: IoU 1/2 and 2/3."""
    labels = torch.tensor([[[1, 1], [0, 0]]])
    predicted = torch.tensor([[[0, 1], [0, 0]]])
    loss = lovasz_softmax(one_hot(predicted, 2), labels)
    assert float(loss) == pytest.approx(1.0 - (1 / 2 + 2 / 3) / 2)


@pytest.mark.parametrize("classes", ["present", "all"])
def test_soft_prediction_matches_the_brute_force_integral(classes):
    gen = torch.Generator().manual_seed(1)
    probs = torch.randn(2, 4, 3, 3, generator=gen).softmax(dim=1)
    labels = torch.randint(0, 3, (2, 3, 3), generator=gen)
    expected = brute_force_lovasz(probs.numpy(), labels.numpy(), classes)
    assert float(lovasz_softmax(probs, labels, classes=classes)) == pytest.approx(expected, abs=2e-4)


def test_lovasz_grad_of_a_sorted_binary_column():
    """Jaccard losses of the growing prefixes of [1, 0, 1]: 1/2, 2/3, 1 → increments 1/2, 1/6, 1/3."""
    weights = lovasz_grad(torch.tensor([[1.0], [0.0], [1.0]]))
    torch.testing.assert_close(weights.flatten(), torch.tensor([0.5, 1 / 6, 1 / 3]))


def test_voxels_are_flattened_so_3d_equals_its_2d_reshape_and_gradient_is_finite():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 3, 2, 3, 4, generator=gen, requires_grad=True)
    labels = torch.randint(0, 3, (1, 2, 3, 4), generator=gen)
    loss_3d = lovasz_softmax(logits.softmax(dim=1), labels)
    loss_2d = lovasz_softmax(logits.softmax(dim=1).reshape(1, 3, 6, 4), labels.reshape(1, 6, 4))
    torch.testing.assert_close(loss_3d, loss_2d)
    loss_3d.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_per_image_and_ignore_index():
    gen = torch.Generator().manual_seed(3)
    probs = torch.randn(2, 2, 4, 4, generator=gen).softmax(dim=1)
    labels = torch.randint(0, 2, (2, 4, 4), generator=gen)
    separate = [lovasz_softmax(probs[i:i + 1], labels[i:i + 1]) for i in range(2)]
    torch.testing.assert_close(lovasz_softmax(probs, labels, per_image=True), (separate[0] + separate[1]) / 2)
    ignored = labels.clone()
    ignored[:, :2] = 255
    kept = lovasz_softmax(probs[:, :, 2:].contiguous(), labels[:, 2:].contiguous())
    torch.testing.assert_close(lovasz_softmax(probs, ignored, ignore_index=255), kept)
    with pytest.raises(ValueError):
        lovasz_softmax(probs, labels, classes="some")
