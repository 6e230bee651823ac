"""Transformation consistency (Bortsova et al. 2019): divergences, elastic layer, alignment, one step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from semiseg.augment import AugmentSettings
from semiseg.components.elastic import (deformed_valid_mask, elastic_deform, elastic_deform_labels,
                                        elastic_deform_pair, sample_displacement)
from semiseg.losses import one_hot, symmetric_kl_divergence
from semiseg.methods import Progress, build_method
from semiseg.methods.transform_consistency import (SampledTransform, TransformConsistencyParams, probability_divergence,
                                                   sample_transform, shift_affine)

END = Progress(step=0, epoch=0.0, max_epochs=1)


def _batch(dims: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    spatial = (16, 16) if dims == 2 else (8, 16, 16)
    labels = torch.zeros((2, *spatial), dtype=torch.long)
    labels[(slice(None),) + (slice(3, -3),) * dims] = 1
    return {"image_l": labels[:, None].float() + 0.1 * torch.randn((2, 1, *spatial), generator=gen),
            "label_l": labels, "image_u": torch.randn((2, 1, *spatial), generator=gen)}


def _square_labels(dims: int) -> torch.Tensor:
    spatial = (24, 24) if dims == 2 else (12, 16, 16)
    labels = torch.zeros((2, *spatial), dtype=torch.long)
    labels[(slice(None),) + tuple(slice(s // 4, 3 * s // 4) for s in spatial)] = 1
    return labels


def test_symmetric_kl_matches_the_direct_sum_and_is_zero_for_identical_inputs():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(2, 3, 4, 5, generator=gen).softmax(dim=1)
    q = torch.randn(2, 3, 4, 5, generator=gen).softmax(dim=1)
    direct = (p * (p / q).log() + q * (q / p).log()).sum(dim=1).mean()
    torch.testing.assert_close(symmetric_kl_divergence(p, q), direct)
    torch.testing.assert_close(probability_divergence("symmetric_kl", p, q), direct)
    assert float(symmetric_kl_divergence(p, p)) == pytest.approx(0.0, abs=1e-7)


def test_divergences_keep_the_gradient_of_both_branches_and_respect_the_mask():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(1, 2, 2, 2, generator=gen).softmax(dim=1).requires_grad_()
    q = torch.randn(1, 2, 2, 2, generator=gen).softmax(dim=1).requires_grad_()
    for name in ("symmetric_kl", "mse"):
        p.grad = q.grad = None
        probability_divergence(name, p, q).backward()
        assert p.grad.abs().sum() > 0 and q.grad.abs().sum() > 0
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    expected = ((p - q) ** 2).sum(dim=1)[0, 0, 0]
    torch.testing.assert_close(probability_divergence("mse", p, q, mask), expected)
    with pytest.raises(ValueError):
        probability_divergence("l1", p, q)


def test_zero_displacement_is_the_identity():
    x = torch.rand(2, 3, 8, 9)
    torch.testing.assert_close(elastic_deform(x, torch.zeros(2, 2, 3, 3)), x)
    labels = torch.randint(0, 3, (2, 4, 6, 5))
    assert torch.equal(elastic_deform_labels(labels, torch.zeros(2, 3, 3, 3, 3)), labels)


@pytest.mark.parametrize("dims", [2, 3])
def test_elastic_deformation_moves_image_probabilities_and_labels_together(dims):
    labels = _square_labels(dims)
    probs = one_hot(labels, 2)
    image = probs[:, 1:2] * 3.0
    images_t, probs_t, displacement = elastic_deform_pair(image, probs, sigma=2.0, points=3,
                                                          generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(probs_t, probs)
    torch.testing.assert_close(images_t, elastic_deform(image, displacement))
    torch.testing.assert_close(images_t / 3.0, probs_t[:, 1:2], atol=1e-5, rtol=0)
    valid = deformed_valid_mask(probs, displacement).squeeze(1).bool()
    agree = probs_t.argmax(dim=1) == elastic_deform_labels(labels, displacement)
    assert agree[valid].float().mean() > 0.97
    torch.testing.assert_close(probs_t.sum(dim=1)[valid], torch.ones(int(valid.sum())), atol=1e-5, rtol=0)


def test_samples_get_their_own_displacement_and_gradient_flows_through_the_layer():
    displacement = sample_displacement(2, 2, 3.0, 3, torch.Generator().manual_seed(0))
    assert displacement.shape == (2, 2, 3, 3) and not torch.equal(displacement[0], displacement[1])
    probs = torch.rand(2, 2, 12, 12, requires_grad=True)
    weights = torch.rand(2, 2, 12, 12)
    (elastic_deform(probs, displacement) * weights).sum().backward()
    assert torch.isfinite(probs.grad).all() and probs.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        elastic_deform(probs, displacement[:1])


def test_shift_stays_within_the_maximum_and_moves_labels_with_the_image():
    spatial = (32, 32)
    theta = shift_affine(64, spatial, 10.0, torch.Generator().manual_seed(0))
    shifts = theta[:, :, 2] * torch.tensor([spatial[1], spatial[0]]) / 2.0
    assert shifts.abs().max() <= 10.0 and shifts.abs().max() > 8.0
    labels = torch.zeros(1, *spatial, dtype=torch.long)
    labels[:, 12:20, 12:20] = 1
    transform = SampledTransform("shift", theta=shift_affine(1, spatial, 10.0, torch.Generator().manual_seed(5)))
    moved = transform.images(one_hot(labels, 2))[:, 1] > 0.5
    moved_labels = transform.labels(labels).bool()
    iou = (moved & moved_labels).sum() / (moved | moved_labels).sum()
    assert iou > 0.85 and not torch.equal(moved_labels, labels.bool())


def test_transformed_prediction_equals_prediction_of_transformed_input_for_an_equivariant_network():
    """T(f(x)) = f(T(x)) for a convolution (translation-equivariant) and an integer shift."""
    gen = torch.Generator().manual_seed(0)
    network = nn.Conv2d(1, 2, 3, padding=1)
    x = torch.randn(1, 1, 20, 20, generator=gen)
    theta = torch.tensor([[[1.0, 0.0, 2 * 3 / 20], [0.0, 1.0, -2 * 2 / 20]]])
    transform = SampledTransform("shift", theta=theta)
    with torch.no_grad():
        t_of_f = transform.probs(network(x).softmax(dim=1))
        f_of_t = network(transform.images(x)).softmax(dim=1)
    inner = (slice(None), slice(None), slice(4, -4), slice(5, -5))
    torch.testing.assert_close(t_of_f[inner], f_of_t[inner], atol=1e-5, rtol=0)
    assert not torch.allclose(t_of_f[inner], network(x).softmax(dim=1)[inner], atol=1e-3)


def test_noise_transform_leaves_probabilities_and_labels_and_clips_images():
    images = torch.rand(2, 1, 8, 8)
    transform = sample_transform("noise", images, TransformConsistencyParams(noise_std=0.5), AugmentSettings(),
                                 torch.Generator().manual_seed(0))
    noisy = transform.images(images)
    assert not torch.equal(noisy, images)
    assert noisy.min() >= images.min() and noisy.max() <= images.max()
    probs = torch.rand(2, 2, 8, 8)
    assert transform.probs(probs) is probs and transform.mask(probs) is None
    with pytest.raises(ValueError):
        sample_transform("flip", images, TransformConsistencyParams(), AugmentSettings(), None)


def test_consistency_is_near_zero_for_a_pointwise_network_on_a_smooth_image(tiny_context):
    """The method compares aligned maps: a per-voxel network on a smooth image is almost consistent."""
    method = build_method("transform_consistency", tiny_context(), {"transform": "shift", "base_augment": False})
    method.trained["student"] = nn.Conv2d(1, 2, 1)
    grid = torch.linspace(-1, 1, 16)
    smooth = (grid[:, None] + grid[None, :]).expand(2, 1, 16, 16)
    batch = {"image_l": smooth, "label_l": (smooth[:, 0] > 0).long(), "image_u": smooth.flip(-1)}
    aligned = float(method.training_step(batch, END).logs["loss_cons"])
    method.params = replace(method.params, divergence="mse")
    assert aligned < 1e-3
    assert float(method.training_step(batch, END).logs["loss_cons"]) < 1e-3


@pytest.mark.parametrize("dims,transform", [(2, "elastic"), (3, "elastic"), (2, "shift"), (2, "rotation"),
                                            (2, "noise"), (3, "affine")])
def test_one_step_is_finite_and_its_consistency_trains_the_network(dims, transform, tiny_context):
    method = build_method("transform_consistency", tiny_context(dims), {"transform": transform})
    method.train()
    output = method.training_step(_batch(dims), END)
    assert torch.isfinite(output.objectives["main"]) and output.logs["cons_weight"] == 1.0
    assert float(output.logs["loss_cons"]) > 0
    assert float(output.unsupervised.detach()) == pytest.approx(float(output.logs["loss_cons"]))
    output.unsupervised.backward()
    grads = [p.grad for p in method.trained["student"].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
