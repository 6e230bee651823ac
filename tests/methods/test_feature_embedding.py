"""Random feature embedding (Baur et al. 2017): sampling, distances, margin loss, the method."""

from __future__ import annotations

from dataclasses import replace

import math

import pytest
import torch

from semiseg.augment import identity_affine
from semiseg.components.embedding import (
    angular_cosine_distance,
    foreground_fraction,
    l2_distance,
    margin_embedding_loss,
    pairwise_distance,
    random_feature_embedding_loss,
    sample_pixels,
)
from semiseg.methods import Progress, build_method

SPATIAL = {2: (16, 16), 3: (8, 16, 16)}


def _batch(dims: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    spatial = SPATIAL[dims]
    labels = torch.zeros((2, *spatial), dtype=torch.long)
    centre = tuple(slice(s // 4, 3 * s // 4) for s in spatial)
    labels[(slice(None), *centre)] = 1
    return {"image_l": torch.randn((2, 1, *spatial), generator=generator) + labels.unsqueeze(1).float(),
            "label_l": labels,
            "image_u": torch.randn((2, 1, *spatial), generator=generator)}


def _objective(method, batch: dict, weight: float) -> torch.Tensor:
    """The main objective with a given embedding weight, with every random draw replayed."""
    method.params = replace(method.params, embedding_weight=weight)
    method.generator.manual_seed(5)
    torch.manual_seed(5)
    return method.training_step(batch, Progress(step=0, epoch=0.0, max_epochs=1)).objectives["main"]


def _classes_with_foreground(n: int, n_foreground: int) -> torch.Tensor:
    classes = torch.zeros(n, dtype=torch.long)
    classes[:n_foreground] = 1
    return classes


@pytest.mark.parametrize(("strategy", "expected"), [("uniform50", 0.5), ("distribution", 0.1), ("80_20", 0.2)])
def test_sampled_foreground_share_follows_the_strategy(strategy, expected):
    classes = _classes_with_foreground(1000, 100)
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_pixels(classes, 100, strategy, generator) for _ in range(50)])
    assert draws.numel() == 5000
    share = float((classes[draws] > 0).float().mean())
    assert share == pytest.approx(expected, abs=0.02)
    assert foreground_fraction(strategy, classes) == pytest.approx(expected)


def test_sampling_covers_each_group_uniformly_and_skips_unused_pixels():
    classes = torch.tensor([1, 1, 0, 0, -1, -1, -1, -1])
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_pixels(classes, 10, "uniform50", generator) for _ in range(400)])
    counts = torch.bincount(draws, minlength=8).float()
    assert counts[4:].sum() == 0
    torch.testing.assert_close(counts[:4] / counts.sum(), torch.full((4,), 0.25), atol=0.02, rtol=0)


def test_sampling_takes_everything_from_the_only_group_present():
    generator = torch.Generator().manual_seed(0)
    background_only = torch.tensor([0, 0, 0, -1])
    assert set(sample_pixels(background_only, 20, "uniform50", generator).tolist()) <= {0, 1, 2}
    assert sample_pixels(torch.full((5,), -1), 20, "80_20", generator).numel() == 0


def test_unknown_strategy_and_distance_are_rejected():
    with pytest.raises(ValueError, match="sampling strategy"):
        sample_pixels(torch.tensor([0, 1]), 4, "90_10")
    with pytest.raises(ValueError, match="distance"):
        pairwise_distance("l1", torch.ones(2, 3))


def test_cosine_distance_is_zero_for_same_direction_and_maximal_for_opposite():
    x = torch.tensor([[1.0, 2.0, -1.0], [3.0, 6.0, -3.0], [-1.0, -2.0, 1.0], [2.0, -1.0, 0.0]])
    d = angular_cosine_distance(x)
    assert float(d[0, 1]) == pytest.approx(0.0, abs=1e-6)
    assert float(d[0, 2]) == pytest.approx(2.0, abs=1e-6)
    assert float(d[0, 3]) == pytest.approx(1.0, abs=1e-6)
    assert float(d.max()) == pytest.approx(2.0, abs=1e-6)
    torch.testing.assert_close(d, d.t())
    assert float(angular_cosine_distance(torch.tensor([[2.0, 0.0], [3.0, 3.0]]))[0, 1]) == pytest.approx(
        1 - 1 / math.sqrt(2), abs=1e-6)


def test_l2_distance_matches_the_norm_and_has_finite_gradient_on_identical_rows():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]], requires_grad=True)
    d = l2_distance(x)
    assert float(d[0, 1].detach()) == pytest.approx(5.0)
    assert float(d[0, 2].detach()) == 0.0
    d.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(("similar", "margin", "expected"), [(True, 1.0, 0.3), (False, 1.0, 0.7), (False, 0.2, 0.0)])
def test_margin_loss_on_one_pair(similar, margin, expected):
    distances = torch.tensor([[0.0, 0.3], [0.3, 0.0]])
    adjacency = torch.full((2, 2), similar)
    assert float(margin_embedding_loss(distances, adjacency, margin)) == pytest.approx(expected)


def test_margin_loss_averages_mixed_pairs_without_the_diagonal():
    distances = torch.tensor([[0.0, 0.3, 0.9], [0.3, 0.0, 0.5], [0.9, 0.5, 0.0]])
    adjacency = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    expected = 2 * (0.3 + (1 - 0.9) + (1 - 0.5)) / 6
    assert float(margin_embedding_loss(distances, adjacency, 1.0)) == pytest.approx(expected)


def test_embedding_loss_with_l2_on_hand_built_features():
    """Pixels (0,0), (3,4), (0,1); the drawn pixels are replayed and Eq. 2 is evaluated by hand."""
    features = torch.tensor([[0.0, 3.0, 0.0], [0.0, 4.0, 1.0]]).view(1, 2, 1, 3)
    classes = torch.tensor([[[0, 1, 1]]])
    loss = random_feature_embedding_loss(features, classes, num_samples=3, strategy="uniform50",
                                         distance="l2", margin=1000.0, generator=torch.Generator().manual_seed(0))
    index = sample_pixels(classes.view(-1), 3, "uniform50", torch.Generator().manual_seed(0))
    points = features.view(2, 3).t()[index]
    labels = classes.view(-1)[index]
    terms = []
    for i in range(3):
        for j in range(3):
            if i != j:
                d = math.dist(points[i].tolist(), points[j].tolist())
                terms.append(d if labels[i] == labels[j] else max(0.0, 1000.0 - d))
    assert float(loss) == pytest.approx(sum(terms) / len(terms))


def test_embedding_loss_is_zero_for_orthogonal_classes_and_collapsed_same_class():
    features = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 3.0]]).view(1, 2, 2, 2)
    classes = torch.tensor([[[0, 0], [1, 1]]])
    loss = random_feature_embedding_loss(features, classes, num_samples=8, strategy="uniform50",
                                         distance="acd", margin=1.0)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    rotated = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]).view(1, 2, 2, 2)
    mixed = random_feature_embedding_loss(rotated, torch.tensor([[[0, 1], [0, 1]]]), num_samples=8,
                                          strategy="uniform50", distance="acd", margin=1.0)
    assert float(mixed) > 0.1


def test_pixel_classes_use_labels_then_the_prediction_and_mark_outside_pixels(tiny_context):
    method = build_method("feature_embedding", tiny_context(2), {})
    labels = torch.tensor([[[0, 1], [1, 0]]])
    logits = torch.zeros(2, 2, 2, 2)
    logits[1, 1, 0, :] = 5.0
    classes = method._pixel_classes(labels, logits, identity_affine(2, 2))
    torch.testing.assert_close(classes, torch.tensor([[[0, 1], [1, 0]], [[1, 1], [0, 0]]]))
    shifted = identity_affine(2, 2)
    shifted[:, 0, 2] = 1.0
    outside = method._pixel_classes(labels, logits, shifted)
    assert (outside[:, :, 1] == -1).all()
    assert (outside[:, :, 0] >= 0).all()


@pytest.mark.parametrize("dims", [2, 3])
def test_training_step_is_finite_and_the_embedding_term_trains_the_network(dims, tiny_context):
    method = build_method("feature_embedding", tiny_context(dims), {"num_samples": 40})
    method.train()
    batch = _batch(dims)
    output = method.training_step(batch, Progress(step=0, epoch=0.0, max_epochs=1))
    assert set(output.objectives) == {"main"}
    assert torch.isfinite(output.objectives["main"])
    assert float(output.logs["loss_cons"]) > 0
    params = list(method.trained["student"].parameters())
    term = _objective(method, batch, 1.0) - _objective(method, batch, 0.0)
    assert term.item() > 0
    grads = torch.autograd.grad(term, params, allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_prior_none_ignores_the_unlabelled_images(tiny_context):
    method = build_method("feature_embedding", tiny_context(2), {"num_samples": 40, "unlabelled_prior": "none"})
    method.train()
    batch = _batch(2)
    batch["image_u"] = torch.full_like(batch["image_u"], float("nan"))
    output = method.training_step(batch, Progress(step=0, epoch=0.0, max_epochs=1))
    assert torch.isfinite(output.objectives["main"])
    assert float(output.logs["loss_cons"]) > 0


def test_invalid_choice_is_rejected(tiny_context):
    with pytest.raises(ValueError, match="distance"):
        build_method("feature_embedding", tiny_context(2), {"distance": "cosine"})


def test_state_dict_round_trip(tiny_context):
    source = build_method("feature_embedding", tiny_context(2, seed=0), {})
    target = build_method("feature_embedding", tiny_context(2, seed=1), {})
    source.generator.manual_seed(9)
    target.load_state_dict(source.state_dict())
    for a, b in zip(source.trained["student"].state_dict().values(), target.trained["student"].state_dict().values()):
        torch.testing.assert_close(a, b)
    assert torch.equal(source.generator.get_state(), target.generator.get_state())
