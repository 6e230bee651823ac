"""Π-model (Laine & Aila 2017): alignment of the two passes, the consistency, its weight, its gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semiseg.augment import AugmentedBatch, AugmentSettings, augment_batch, sample_affine, warp, warp_labels
from semiseg.components.alignment import invert_affine, to_original_frame
from semiseg.losses import supervised_loss
from semiseg.methods import Progress, build_method
from semiseg.methods.pi_model import aligned_squared_error, labelled_fraction

NO_AUGMENTATION = AugmentSettings(rotation_deg=0.0, scale=0.0, shift=0.0, noise_std=0.0, intensity=0.0)
START = Progress(step=0, epoch=0.0, max_epochs=1)


def _batch(dims: int, n_l: int = 2, n_u: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    spatial = (16, 16) if dims == 2 else (8, 16, 16)
    labels = torch.zeros((n_l, *spatial), dtype=torch.long)
    labels[(slice(None),) + tuple(slice(s // 4, 3 * s // 4) for s in spatial)] = 1
    return {"image_l": labels[:, None].float() + 0.3 * torch.randn((n_l, 1, *spatial), generator=gen),
            "label_l": labels, "image_u": torch.randn((n_u, 1, *spatial), generator=gen)}


def _shift_theta(batch: int, dims: int, voxels: int, size: int) -> torch.Tensor:
    """Integer shift by ``voxels`` along the last tensor axis (affine_grid's x), of length ``size``."""
    theta = torch.zeros(batch, dims, dims + 1)
    for axis in range(dims):
        theta[:, axis, axis] = 1.0
    theta[:, 0, dims] = 2.0 * voxels / size
    return theta


def _quarter_turn_theta(batch: int, dims: int) -> torch.Tensor:
    """90° rotation in the plane of the last two tensor axes (exact on a square grid)."""
    theta = torch.zeros(batch, dims, dims + 1)
    theta[:, 0, 1], theta[:, 1, 0] = -1.0, 1.0
    if dims == 3:
        theta[:, 2, 2] = 1.0
    return theta


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    dims = theta.shape[1]
    bottom = torch.zeros(theta.shape[0], 1, dims + 1, dtype=theta.dtype)
    bottom[:, 0, dims] = 1.0
    return torch.cat([theta, bottom], dim=1)


@pytest.mark.parametrize("dims", [2, 3])
def test_invert_affine_composes_to_the_identity(dims):
    theta = sample_affine(4, dims, AugmentSettings(rotation_deg=30.0, scale=0.2, shift=0.1),
                          torch.Generator().manual_seed(0), shape=(8,) * dims)
    product = _homogeneous(invert_affine(theta).double()) @ _homogeneous(theta.double())
    torch.testing.assert_close(product, torch.eye(dims + 1, dtype=torch.float64).expand_as(product),
                               atol=1e-6, rtol=0)
    assert invert_affine(theta).dtype == theta.dtype


@pytest.mark.parametrize("dims", [2, 3])
def test_a_known_transform_pair_is_aligned_exactly_on_the_valid_voxels(dims):
    size = 8
    spatial = (4, size, size) if dims == 3 else (size, size)
    probs = torch.randn((2, 3, *spatial), generator=torch.Generator().manual_seed(0)).softmax(dim=1)
    theta_shift, theta_turn = _shift_theta(2, dims, 2, size), _quarter_turn_theta(2, dims)
    view_shift, view_turn = warp(probs, theta_shift), warp(probs, theta_turn)
    assert not torch.allclose(view_shift, view_turn, atol=1e-2)
    aligned_shift, mask_shift = to_original_frame(view_shift, theta_shift)
    aligned_turn, mask_turn = to_original_frame(view_turn, theta_turn)
    # The quarter turn keeps the whole field of view; the 2-voxel shift loses 2 columns.
    assert torch.equal(mask_turn, torch.ones_like(mask_turn))
    assert torch.equal(mask_shift[..., :2], torch.zeros_like(mask_shift[..., :2]))
    assert torch.equal(mask_shift[..., 2:], torch.ones_like(mask_shift[..., 2:]))
    torch.testing.assert_close(aligned_turn, probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(aligned_shift * mask_shift, probs * mask_shift, atol=1e-5, rtol=0)
    assert float(aligned_squared_error(aligned_shift, aligned_turn, mask_shift * mask_turn)) < 1e-10
    # Without alignment the two views disagree.
    assert float(aligned_squared_error(view_shift, view_turn, mask_shift * mask_turn)) > 1e-2


def test_aligned_squared_error_matches_a_hand_computation_and_its_gradient():
    # [B=1, C=2, H=1, W=2]; voxel 0 valid, voxel 1 masked out.
    p = torch.tensor([[[[0.8, 0.3]], [[0.2, 0.7]]]], requires_grad=True)
    q = torch.tensor([[[[0.6, 0.9]], [[0.4, 0.1]]]], requires_grad=True)
    mask = torch.tensor([[[[1.0, 0.0]]]])
    loss = aligned_squared_error(p, q, mask)
    # voxel 0: 0.2² + 0.2² = 0.08 (the paper's class average would be 0.04); voxel 1 ignored.
    assert float(loss.detach()) == pytest.approx(0.08, abs=1e-7)
    loss.backward()
    torch.testing.assert_close(p.grad, torch.tensor([[[[0.4, 0.0]], [[-0.4, 0.0]]]]))
    torch.testing.assert_close(q.grad, -p.grad)
    unmasked = aligned_squared_error(p, q, torch.ones_like(mask)).detach()
    assert float(unmasked) == pytest.approx((0.08 + 0.72) / 2, abs=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("stop_gradient", [False, True])
def test_a_deterministic_network_without_augmentation_is_consistent_with_itself(dims, stop_gradient, tiny_context):
    method = build_method("pi_model", tiny_context(dims, dropout=0.0, augment=NO_AUGMENTATION),
                          {"stop_gradient": stop_gradient})
    method.train()
    output = method.training_step(_batch(dims), START)
    assert float(output.logs["loss_cons"]) == pytest.approx(0.0, abs=1e-12)
    assert float(output.logs["loss_sup"]) > 0


@pytest.mark.parametrize("dims", [2, 3])
def test_dropout_and_augmentation_each_make_the_two_passes_differ(dims, tiny_context):
    dropout_only = build_method("pi_model", tiny_context(dims, dropout=0.5, augment=NO_AUGMENTATION), {})
    augment_only = build_method("pi_model", tiny_context(dims, dropout=0.0), {})
    torch.manual_seed(0)
    for method in (dropout_only, augment_only):
        method.train()
        assert float(method.training_step(_batch(dims), START).logs["loss_cons"]) > 1e-6


def test_an_equivariant_network_under_a_known_transform_pair_has_zero_consistency(tiny_context):
    """End to end: a pointwise network commutes with an integer shift and a quarter turn."""
    method = build_method("pi_model", tiny_context(2), {})
    torch.manual_seed(0)
    method.trained["student"] = nn.Sequential(nn.Conv2d(1, 4, 1), nn.Tanh(), nn.Conv2d(4, 2, 1))
    batch = _batch(2)
    original = torch.cat([batch["image_l"], batch["image_u"]])
    views = []
    for theta in (_shift_theta(4, 2, 2, 16), _quarter_turn_theta(4, 2)):
        views.append(AugmentedBatch(original=original, images=warp(original, theta),
                                    labels=warp_labels(batch["label_l"], theta[:2]), theta=theta, n_l=2))
    method.augment_batch = lambda _batch, **_: views.pop(0)
    output = method.training_step(batch, START)
    assert float(output.logs["loss_cons"]) < 1e-10
    # The same network on unaligned views would disagree: the check above can fail.
    student = method.trained["student"]
    with torch.no_grad():
        unaligned = aligned_squared_error(student(warp(original, _shift_theta(4, 2, 2, 16))).softmax(dim=1),
                                          student(warp(original, _quarter_turn_theta(4, 2))).softmax(dim=1),
                                          torch.ones(4, 1, 16, 16))
    assert float(unaligned) > 1e-3


def _independent_step(network: nn.Module, batch, dims: int, settings: AugmentSettings, generator: torch.Generator,
                      stop_gradient: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Supervised and consistency losses recomputed with affine_grid, grid_sample and a 4x4 inverse."""
    first = augment_batch(batch, dims, settings, generator)
    second = augment_batch(batch, dims, settings, generator)
    with torch.no_grad():
        if stop_gradient:
            logits = [network(first.images), network(second.images)]
        else:
            logits = list(network(torch.cat([first.images, second.images])).split(first.images.shape[0]))
    shape = list(first.images.shape)
    aligned, masks = [], []
    for view, view_logits in zip((first, second), logits):
        inverse = torch.linalg.inv(_homogeneous(view.theta.double()))[:, :dims].float()
        back = F.affine_grid(inverse, shape[:1] + [2] + shape[2:], align_corners=False)
        aligned.append(F.grid_sample(view_logits.softmax(dim=1), back, align_corners=False))
        forward = F.affine_grid(view.theta, shape[:1] + [1] + shape[2:], align_corners=False)
        ones = torch.ones(shape[:1] + [1] + shape[2:])
        inside = (F.grid_sample(ones, forward, align_corners=False) > 0.999).float()
        masks.append(F.grid_sample(inside, back, align_corners=False) > 0.999)
    valid = (masks[0] & masks[1]).squeeze(1)
    per_voxel = ((aligned[0] - aligned[1]) ** 2).sum(dim=1)
    consistency = per_voxel[valid].mean()
    return supervised_loss("dice_ce", logits[0][:first.n_l], first.labels), consistency


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("stop_gradient", [False, True])
def test_step_losses_match_an_independent_computation(dims, stop_gradient, tiny_context):
    settings = AugmentSettings(rotation_deg=20.0, scale=0.15, shift=0.1)
    method = build_method("pi_model", tiny_context(dims, dropout=0.0, augment=settings, rampup_epochs=10.0),
                          {"consistency": 3.0, "stop_gradient": stop_gradient, "scale_by_labelled_fraction": True})
    method.train()
    generator = torch.Generator()
    generator.set_state(method.generator.get_state())
    batch = _batch(dims, n_l=1, n_u=3)
    progress = Progress(step=0, epoch=5.0, max_epochs=20, stage_epoch=5.0)
    output = method.training_step(batch, progress)
    loss_sup, loss_cons = _independent_step(method.trained["student"], batch, dims, settings, generator,
                                            stop_gradient)
    assert float(loss_cons) > 1e-5
    torch.testing.assert_close(output.logs["loss_cons"], loss_cons, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(output.logs["loss_sup"], loss_sup, rtol=1e-5, atol=1e-7)
    weight = 3.0 * math.exp(-5.0 * 0.5 ** 2) * 0.25
    assert output.logs["cons_weight"] == pytest.approx(weight, rel=1e-12)
    torch.testing.assert_close(output.objectives["main"].detach(), loss_sup + weight * loss_cons,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale,fraction", [(True, 2 / 8), (False, 1.0)])
def test_weight_is_consistency_times_rampup_times_labelled_fraction(scale, fraction, tiny_context):
    method = build_method("pi_model", tiny_context(rampup_epochs=10.0),
                          {"consistency": 3.0, "scale_by_labelled_fraction": scale})
    method.train()
    for stage_epoch in (0.0, 2.5, 10.0, 12.0):
        progress = Progress(step=0, epoch=stage_epoch, max_epochs=20, stage_epoch=stage_epoch)
        ramp = math.exp(-5.0 * (1.0 - min(stage_epoch / 10.0, 1.0)) ** 2)
        output = method.training_step(_batch(2, n_l=2, n_u=6), progress)
        assert output.logs["cons_weight"] == pytest.approx(3.0 * ramp * fraction, rel=1e-12)


def test_labelled_fraction_is_the_batch_share():
    image = torch.zeros(1, 1, 2, 2)
    assert labelled_fraction({"image_l": image.expand(3, -1, -1, -1), "image_u": image.expand(5, -1, -1, -1)}) == 3 / 8
    assert labelled_fraction({"image_l": image}) == 1.0


def _record_outputs(method) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    method.trained["student"].register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
    return outputs


@pytest.mark.parametrize("dims", [2, 3])
def test_without_stop_gradient_the_consistency_trains_through_both_passes(dims, tiny_context):
    method = build_method("pi_model", tiny_context(dims), {"stop_gradient": False})
    method.train()
    outputs = _record_outputs(method)
    output = method.training_step(_batch(dims), START)
    assert len(outputs) == 1 and outputs[0].shape[0] == 8
    gradient = torch.autograd.grad(output.unsupervised, outputs[0])[0]
    first, second = gradient.split(4)
    assert float(first.abs().sum()) > 0 and float(second.abs().sum()) > 0


@pytest.mark.parametrize("dims", [2, 3])
def test_with_stop_gradient_the_second_pass_is_a_fixed_target(dims, tiny_context):
    method = build_method("pi_model", tiny_context(dims), {"stop_gradient": True})
    method.train()
    outputs = _record_outputs(method)
    output = method.training_step(_batch(dims), START)
    assert len(outputs) == 2 and outputs[0].requires_grad and not outputs[1].requires_grad
    gradient = torch.autograd.grad(output.unsupervised, outputs[0], retain_graph=True)[0]
    assert float(gradient.abs().sum()) > 0
    # The supervised term also reaches the network only through the first pass.
    parameters = list(method.trained["student"].parameters())
    gradients = torch.autograd.grad(output.objectives["main"], parameters)
    assert all(g is not None for g in gradients)
