"""Multi-view co-training (Xia et al. 2020): views, uncertainty-weighted fusion, gradients, evaluation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.augment import AugmentedBatch
from semiseg.components.views import (VIEWS_2D, VIEWS_3D, ViewEnsemble, fuse_other_views, from_view,
                                      mc_dropout_probs, to_view)
from semiseg.config import ConfigError
from semiseg.losses import supervised_loss
from semiseg.methods import Progress, build_method

SEMI = Progress(step=5, epoch=3.0, max_epochs=10, stage_epoch=3.0)


def _batch(dims: int, spatial: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    spatial = spatial or ((16, 16) if dims == 2 else (8, 16, 16))
    labels = torch.zeros((2, *spatial), dtype=torch.long)
    labels[(slice(None),) + tuple(slice(s // 4, 3 * s // 4) for s in spatial)] = 1
    image_l = labels[:, None].float() + 0.3 * torch.randn((2, 1, *spatial), generator=gen)
    image_u = torch.randn((2, 1, *spatial), generator=gen)
    return {"image_l": image_l, "label_l": labels, "image_u": image_u}


def _no_augmentation(method, batch):
    """Make ``method.augment_batch`` return the batch as it is, so expected values can be computed."""
    images = torch.cat([batch["image_l"], batch["image_u"]])
    fixed = AugmentedBatch(original=images, images=images, labels=batch["label_l"],
                           theta=torch.zeros(len(images)), n_l=len(batch["image_l"]))
    method.augment_batch = lambda *args, **kwargs: fixed


# --- views ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims,table", [(2, VIEWS_2D), (3, VIEWS_3D)])
def test_views_are_exact_inverses_and_each_is_a_distinct_orientation(dims, table):
    gen = torch.Generator().manual_seed(0)
    uneven = torch.randn((2, 3, *((5, 7) if dims == 2 else (3, 4, 5))), generator=gen)
    cube = torch.randn((2, 3, *((6,) * dims)), generator=gen)
    label_map = torch.randint(0, 4, (2, *((5, 7) if dims == 2 else (3, 4, 5))), generator=gen)
    seen = []
    for k, view in enumerate(table):
        viewed = to_view(uneven, k, dims)
        assert viewed.shape[2:] == tuple(uneven.shape[2 + axis] for axis in view.permutation)
        assert torch.equal(from_view(viewed, k, dims), uneven)
        assert torch.equal(from_view(to_view(label_map, k, dims), k, dims), label_map)
        seen.append(to_view(cube, k, dims))
    for k in range(len(table)):
        for j in range(k):
            assert not torch.equal(seen[k], seen[j]), (table[k].name, table[j].name)


def test_2d_views_are_the_transpose_and_the_quarter_turns():
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)
    names = [view.name for view in VIEWS_2D]
    assert names[:3] == ["identity", "transpose", "rot90"]
    assert torch.equal(to_view(x, 0, 2), x)
    assert torch.equal(to_view(x, 1, 2), x.transpose(2, 3))
    assert torch.equal(to_view(x, 2, 2), torch.rot90(x, 1, (2, 3)))
    assert torch.equal(to_view(x, 3, 2), torch.rot90(x, -1, (2, 3)))
    assert torch.equal(to_view(x, 4, 2), torch.rot90(x, 2, (2, 3)))


def test_3d_first_three_views_put_each_axis_first_and_move_voxels_accordingly():
    x = torch.randn((1, 2, 3, 4, 5))
    assert [to_view(x, k, 3).shape[2:] for k in range(3)] == [(3, 4, 5), (4, 5, 3), (5, 3, 4)]
    viewed = to_view(x, 1, 3)
    assert viewed[0, 1, 2, 4, 1] == x[0, 1, 1, 2, 4]  # (h, w, d) in the view is (d, h, w) in the image
    assert torch.equal(viewed, x.permute(0, 1, 3, 4, 2))


# --- fusion ---------------------------------------------------------------------------------------------------

def test_fusion_weights_the_other_views_by_reciprocal_entropy_and_ignores_the_view_itself():
    # Two voxels, two classes; probabilities [B=1, C=2, 1, 2].
    def probs(a, b):
        return torch.tensor([[[[a, b]], [[1 - a, 1 - b]]]])

    p = [probs(0.01, 0.5), probs(0.9, 0.9), probs(0.2, 0.2)]
    u = [torch.tensor([[[[0.0, 0.0]]]]), torch.tensor([[[[0.5, 1.0]]]]), torch.tensor([[[[1.0, 0.25]]]])]
    fused = fuse_other_views(p, u, 0)
    # voxel 0: w = 1/0.5, 1/1 -> (2·0.9 + 1·0.2)/3; voxel 1: w = 1, 4 -> (0.9 + 4·0.2)/5
    torch.testing.assert_close(fused[0, 0, 0], torch.tensor([2.0 / 3.0, 0.34]), atol=2e-6, rtol=0)
    torch.testing.assert_close(fused.sum(dim=1), torch.ones((1, 1, 2)))
    # the plain mean of the others would pick class 0 at voxel 1; the weighting picks class 1
    assert fused.argmax(dim=1).tolist() == [[[0, 1]]]
    # view 0's own (certain, u = 0) prediction would dominate if it were included: it is not
    p_changed = [probs(0.99, 0.01)] + p[1:]
    torch.testing.assert_close(fuse_other_views(p_changed, u, 0), fused)
    # view 1's target uses views 0 and 2: u0 = 0 gives w0 = 1/ε, so view 0's probabilities win
    torch.testing.assert_close(fuse_other_views(p, u, 1)[0, 0, 0], torch.tensor([0.01, 0.5]), atol=1e-5, rtol=0)


def test_fusion_weight_stays_finite_for_a_tiny_negative_entropy():
    p = [torch.full((1, 2, 1, 1), 0.5), torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1),
         torch.tensor([0.3, 0.7]).reshape(1, 2, 1, 1)]
    u = [torch.full((1, 1, 1, 1), 0.7), torch.full((1, 1, 1, 1), -1e-6), torch.full((1, 1, 1, 1), 0.6)]
    fused = fuse_other_views(p, u, 0)
    assert torch.isfinite(fused).all()
    expected_c0 = (1e6 * 1.0 + 0.3 / 0.600001) / (1e6 + 1 / 0.600001)
    assert float(fused[0, 0]) == pytest.approx(expected_c0, rel=1e-6)


class _FixedProbs(nn.Module):
    """A stub segmenter working in ``view``: returns log ``probs`` (given in the image's orientation) in the view."""

    def __init__(self, probs: torch.Tensor, view: int, dims: int) -> None:
        super().__init__()
        self.register_buffer("log_probs", probs.log())
        self.view, self.dims = view, dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = to_view(self.log_probs, self.view, self.dims)
        assert logits.shape[2:] == x.shape[2:], "the stub must receive its view of the image"
        return logits.expand(x.shape[0], *logits.shape[1:])


def _stub_probs(dims: int, k: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10 + k)
    spatial = (3, 4) if dims == 2 else (2, 3, 4)
    return torch.softmax(3.0 * torch.randn((1, 3, *spatial), generator=gen), dim=1)


@pytest.mark.parametrize("dims", [2, 3])
def test_method_targets_are_the_other_views_uncertainty_weighted_argmax(dims, tiny_context):
    method = build_method("co_training", tiny_context(dims, num_classes=3), {})
    probs = [_stub_probs(dims, k) for k in range(3)]
    for k, key in enumerate(method.segmenters):
        method.trained[key] = _FixedProbs(probs[k], k, dims)
    images = torch.zeros((1, 1, *probs[0].shape[2:]))
    targets = method.fused_targets(images)
    weights = [1.0 / ((-(p * torch.log(p + 1e-6)).sum(dim=1, keepdim=True)).clamp_min(0) + 1e-6) for p in probs]
    for k in range(3):
        others = [j for j in range(3) if j != k]
        fused = sum(weights[j] * probs[j] for j in others) / sum(weights[j] for j in others)
        assert torch.equal(targets[k], fused.argmax(dim=1)), k
        assert targets[k].dtype == torch.long and not targets[k].requires_grad
    unweighted = [sum(probs[j] for j in range(3) if j != k).argmax(dim=1) for k in range(3)]
    assert any(not torch.equal(t, u) for t, u in zip(targets, unweighted)), "the weighting must matter here"


def test_mc_dropout_probs_average_stochastic_passes_without_touching_batchnorm():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.Dropout2d(0.5), nn.Conv2d(4, 2, 1))
    network.train()
    running = network[1].running_mean.clone()
    x = torch.randn((2, 1, 3, 5))
    single = mc_dropout_probs(network, x, 1, 2, passes=1)
    averaged = mc_dropout_probs(network, x, 1, 2, passes=64)
    assert single.shape == (2, 2, 3, 5) and averaged.shape == (2, 2, 3, 5)
    assert torch.equal(network[1].running_mean, running), "MC passes must not update BatchNorm statistics"
    assert all(m.training for m in network.modules()), "modes are restored"
    network.eval()
    deterministic = network(x.transpose(2, 3)).softmax(dim=1).transpose(2, 3)
    assert not torch.allclose(single, deterministic, atol=1e-4), "dropout must be active in the passes"
    assert (averaged - deterministic).abs().mean() < (single - deterministic).abs().mean()


# --- the training step ------------------------------------------------------------------------------------------

def _manual_views(dims: int):
    """Independent (torch-op) forms of the first three views and their inverses."""
    if dims == 2:
        return [(lambda x: x, lambda y: y),
                (lambda x: x.transpose(2, 3), lambda y: y.transpose(2, 3)),
                (lambda x: torch.rot90(x, 1, (2, 3)), lambda y: torch.rot90(y, -1, (2, 3)))]
    return [(lambda x: x, lambda y: y),
            (lambda x: x.permute(0, 1, 3, 4, 2), lambda y: y.permute(0, 1, 4, 2, 3)),
            (lambda x: x.permute(0, 1, 4, 2, 3), lambda y: y.permute(0, 1, 3, 4, 2))]


@pytest.mark.parametrize("dims", [2, 3])
def test_step_matches_an_independent_computation(dims, tiny_context):
    context = tiny_context(dims, dropout=0.0, rampup_epochs=10.0)
    method = build_method("co_training", context, {"consistency": 2.0, "mc_passes": 2})
    batch = _batch(dims)
    _no_augmentation(method, batch)
    copies = [copy.deepcopy(method.trained[key]) for key in method.segmenters]
    method.train()
    progress = Progress(step=0, epoch=0.0, max_epochs=10, stage_epoch=0.0)
    output = method.training_step(batch, progress)

    images = torch.cat([batch["image_l"], batch["image_u"]])
    views = _manual_views(dims)
    with torch.no_grad():
        logits = [back(net(forth(images))) for net, (forth, back) in zip(copies, views)]
        sup = sum(supervised_loss(context.supervised_loss, lg[:2], batch["label_l"]) for lg in logits) / 3
        for net in copies:
            net.eval()
        probs = [back(net(forth(images[2:])).softmax(dim=1)) for net, (forth, back) in zip(copies, views)]
    weights = [1.0 / ((-(p * torch.log(p + 1e-6)).sum(dim=1, keepdim=True)).clamp_min(0) + 1e-6) for p in probs]
    cons = 0.0
    for k in range(3):
        others = [j for j in range(3) if j != k]
        target = (sum(weights[j] * probs[j] for j in others) / sum(weights[j] for j in others)).argmax(dim=1)
        cons = cons + F.cross_entropy(logits[k][2:], target) / 3
    weight = 2.0 * math.exp(-5.0)
    assert output.logs["cons_weight"] == pytest.approx(weight)
    torch.testing.assert_close(output.logs["loss_sup"], sup, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.unsupervised.detach(), cons, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.objectives["main"].detach(), sup + weight * cons, rtol=1e-5, atol=1e-6)


def test_each_network_receives_its_own_view(tiny_context):
    method = build_method("co_training", tiny_context(3), {})
    shapes: dict[str, list] = {key: [] for key in method.segmenters}
    for key in method.segmenters:
        method.trained[key].register_forward_pre_hook(
            lambda module, args, key=key: shapes[key].append(tuple(args[0].shape[2:])))
    method.train()
    method.training_step(_batch(3), SEMI)
    assert set(shapes["view0"]) == {(8, 16, 16)}
    assert set(shapes["view1"]) == {(16, 16, 8)}
    assert set(shapes["view2"]) == {(16, 8, 16)}
    assert len(shapes["view0"]) == 1 + method.params.mc_passes  # one training pass, T MC passes


def test_target_sends_no_gradient_to_the_other_views(tiny_context):
    method = build_method("co_training", tiny_context(2), {})
    method.train()
    images = _batch(2)["image_u"]
    logits = [from_view(method.trained[key](to_view(images, k, 2)), k, 2) for k, key in enumerate(method.segmenters)]
    term = method.co_training_loss([logits[0]] + [lg.detach() for lg in logits[1:]], images)
    assert float(term.detach()) > 0
    term.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in method.trained["view0"].parameters())
    for key in method.segmenters[1:]:
        assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in method.trained[key].parameters()), key


def test_without_unlabelled_images_the_term_is_zero_and_attached(tiny_context):
    method = build_method("co_training", tiny_context(2), {})
    batch = _batch(2)
    batch["image_u"] = batch["image_u"][:0]
    method.train()
    output = method.training_step(batch, SEMI)
    assert float(output.unsupervised.detach()) == 0.0 and output.unsupervised.requires_grad


# --- networks, evaluation, hyperparameters ---------------------------------------------------------------------

@pytest.mark.parametrize("dims,views", [(2, 2), (3, 4)])
def test_views_hyperparameter_sets_the_segmenters(dims, views, tiny_context):
    method = build_method("co_training", tiny_context(dims), {"views": views})
    assert method.segmenters == tuple(f"view{k}" for k in range(views)) == tuple(method.trained)
    assert type(method).segmenters == ("student",), "the class attribute is left alone"
    first = [next(method.trained[key].parameters()) for key in method.segmenters]
    assert not torch.equal(first[0], first[1]), "each view has its own initialisation"
    method.train()
    output = method.training_step(_batch(dims), SEMI)
    assert math.isfinite(float(output.objectives["main"].detach()))


def test_views_beyond_the_tables_are_rejected(tiny_context):
    with pytest.raises((ConfigError, ValueError)):
        build_method("co_training", tiny_context(2), {"views": 7})
    with pytest.raises((ConfigError, ValueError)):
        build_method("co_training", tiny_context(2), {"views": 1})


@pytest.mark.parametrize("dims", [2, 3])
def test_view_ensemble_output_softmax_is_the_mean_of_the_views_probabilities(dims):
    probs = [_stub_probs(dims, k) for k in range(3)]
    ensemble = ViewEnsemble([_FixedProbs(p, k, dims) for k, p in enumerate(probs)], dims)
    x = torch.zeros((2, 1, *probs[0].shape[2:]))
    out = ensemble(x)
    expected = (probs[0] + probs[1] + probs[2]) / 3
    torch.testing.assert_close(out.softmax(dim=1), expected.expand_as(out))
    assert torch.equal(out.argmax(dim=1), expected.argmax(dim=1).expand(2, *expected.shape[2:]))


@pytest.mark.parametrize("dims", [2, 3])
def test_eval_model_averages_the_real_views(dims, tiny_context):
    method = build_method("co_training", tiny_context(dims), {})
    model = method.eval_model().eval()
    assert isinstance(model, nn.Module) and set(model.state_dict()) == {
        f"networks.{k}.{name}" for k, key in enumerate(method.segmenters)
        for name in method.trained[key].state_dict()}
    x = _batch(dims)["image_l"]
    with torch.no_grad():
        expected = sum(back(method.trained[key](forth(x)).softmax(dim=1))
                       for key, (forth, back) in zip(method.segmenters, _manual_views(dims))) / 3
        torch.testing.assert_close(model(x).softmax(dim=1), expected, rtol=1e-5, atol=1e-6)
