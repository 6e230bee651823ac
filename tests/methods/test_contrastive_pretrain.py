"""Contrastive pretraining (Chaitanya et al. 2020): the global losses G^R and G^D, the local loss L,
the stages and which networks each one trains."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from semiseg.augment import AugmentSettings
from semiseg.components.contrastive import (domain_contrastive_loss, grouped_contrastive_loss,
                                            local_contrastive_loss, nt_xent_loss, region_features,
                                            slice_partitions, unet_bottleneck)
from semiseg.methods import Progress, build_method
from semiseg.methods.contrastive_pretrain import ContrastivePretrainParams

SPATIAL = {2: (16, 16), 3: (8, 16, 16)}


def _batch(dims: int, positions: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    spatial = SPATIAL[dims]
    labels = torch.zeros((2, *spatial), dtype=torch.long)
    labels[(slice(None), *(slice(s // 4, 3 * s // 4) for s in spatial))] = 1
    batch = {"image_l": torch.randn((2, 1, *spatial), generator=generator),
             "label_l": labels,
             "image_u": torch.randn((2, 1, *spatial), generator=generator)}
    if positions:
        batch.update(position_l=torch.tensor([0.1, 0.6]), position_u=torch.tensor([0.15, 0.9]))
    return batch


def _progress(stage: str, epoch: float = 0.0) -> Progress:
    return Progress(step=0, epoch=epoch, max_epochs=20, stage=stage)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _direct_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    z = torch.cat([z1, z2]).tolist()
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denominator = sum(math.exp(_cosine(z[i], z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(_cosine(z[i], z[j]) / tau) / denominator)
    return total / (2 * n)


def _direct_domain_loss(z1: torch.Tensor, z2: torch.Tensor, partitions: list[int], tau: float) -> float:
    """The paper's Eq. (1) pair by pair: positives share the partition, negatives do not."""
    z = torch.cat([z1, z2]).tolist()
    groups = partitions + partitions
    anchors = []
    for i in range(len(z)):
        negatives = [k for k in range(len(z)) if groups[k] != groups[i]]
        pair_losses = []
        for p in range(len(z)):
            if p == i or groups[p] != groups[i]:
                continue
            positive = math.exp(_cosine(z[i], z[p]) / tau)
            denominator = positive + sum(math.exp(_cosine(z[i], z[k]) / tau) for k in negatives)
            pair_losses.append(-math.log(positive / denominator))
        anchors.append(sum(pair_losses) / len(pair_losses))
    return sum(anchors) / len(anchors)


# ---------------------------------------------------------------- global losses

@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_the_direct_formula(tau):
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 5, generator=generator), torch.randn(4, 5, generator=generator)
    assert float(nt_xent_loss(z1, z2, tau)) == pytest.approx(_direct_nt_xent(z1, z2, tau), rel=1e-5)


def test_matching_views_score_lower_than_shuffled_pairs():
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    shuffled = z.roll(1, dims=0)
    assert float(nt_xent_loss(z, z, 0.1)) < float(nt_xent_loss(z, shuffled, 0.1))


def test_nt_xent_rejects_bad_inputs():
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(torch.ones(2, 3), torch.ones(2, 3), 0.0)
    with pytest.raises(ValueError, match="views"):
        nt_xent_loss(torch.ones(2, 3), torch.ones(3, 3), 0.1)


def test_slice_partitions_split_each_volume_in_s_equal_parts():
    positions = torch.tensor([0.0, 0.24, 0.25, 0.99, 1.0])
    assert slice_partitions(positions, 4).tolist() == [0, 0, 1, 3, 3]
    assert slice_partitions(positions, 1).tolist() == [0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        slice_partitions(torch.tensor([0.5, 1.2]), 4)


def test_domain_loss_by_hand():
    """Images 0 and 1 (different volumes, partition 0) point along x, image 2 (partition 1) along y; τ = 1.

    A partition-0 row has 3 positives (s = 1) and 2 negatives (s = 0): −log(e / (e + 2)) per pair;
    a partition-1 row has 1 positive and 4 negatives: −log(e / (e + 4)).
    """
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    expected = (4 * math.log(1 + 2 / math.e) + 2 * math.log(1 + 4 / math.e)) / 6
    loss = domain_contrastive_loss(z, z, torch.tensor([0, 0, 1]), temperature=1.0)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("partitions", [[0, 0, 1, 2], [1, 1, 1, 0], [0, 1, 2, 3]])
def test_domain_loss_matches_the_pairwise_formula(partitions):
    generator = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(4, 5, generator=generator), torch.randn(4, 5, generator=generator)
    loss = domain_contrastive_loss(z1, z2, torch.tensor(partitions), temperature=0.1)
    assert float(loss) == pytest.approx(_direct_domain_loss(z1, z2, partitions, 0.1), rel=1e-5)


def test_domain_loss_with_one_image_per_partition_is_nt_xent():
    generator = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    torch.testing.assert_close(domain_contrastive_loss(z1, z2, torch.arange(5), 0.2), nt_xent_loss(z1, z2, 0.2))


def test_same_partition_images_of_other_volumes_are_pulled_together():
    """Moving image 1 into image 0's partition makes their similarity a positive: its gradient pulls them closer."""
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(3, 4, generator=generator)
    apart = domain_contrastive_loss(z, z, torch.tensor([0, 1, 2]), 0.5)
    together = domain_contrastive_loss(z, z, torch.tensor([0, 0, 2]), 0.5)
    assert float(apart) != pytest.approx(float(together))
    z_var = z.clone().requires_grad_(True)
    domain_contrastive_loss(z_var, z_var, torch.tensor([0, 0, 2]), 0.5).backward()
    step = z - 0.1 * z_var.grad
    before = _cosine(z[0].tolist(), z[1].tolist())
    assert _cosine(step[0].tolist(), step[1].tolist()) > before


def test_a_partition_without_negatives_contributes_zero_with_a_finite_gradient():
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    loss = grouped_contrastive_loss(z, torch.zeros(3, dtype=torch.long), 0.1)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(z.grad, torch.zeros_like(z))


# ---------------------------------------------------------------- local loss

def test_region_features_average_evenly_spread_regions():
    feature_map = torch.arange(16.0).view(1, 1, 4, 4)
    regions = region_features(feature_map, region_size=2, regions_per_axis=2)
    # the four 2×2 corners of [[0..3], [4..7], [8..11], [12..15]]
    assert regions.shape == (1, 4, 1)
    assert regions.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    overlapping = region_features(torch.arange(5.0).view(1, 1, 1, 5), region_size=3, regions_per_axis=3)
    # the axis of length 1 has one region of 1 pixel; along the other, starts 0, 1, 2
    assert overlapping.flatten().tolist() == [1.0, 2.0, 3.0]


def test_region_features_in_3d():
    volume = torch.arange(27.0).view(1, 1, 3, 3, 3)
    regions = region_features(volume, region_size=2, regions_per_axis=2)
    assert regions.shape == (1, 8, 1)
    assert float(regions[0, 0, 0]) == pytest.approx(float(volume[0, 0, :2, :2, :2].mean()))
    assert float(regions[0, 7, 0]) == pytest.approx(float(volume[0, 0, 1:, 1:, 1:].mean()))


def _direct_local_loss(f1: torch.Tensor, f2: torch.Tensor, starts: list[int], size: int, tau: float) -> float:
    """Per image: the region means by plain slicing, then NT-Xent over the 2R regions (positive: same region)."""
    total = 0.0
    for a, b in zip(f1, f2):
        def means(f: torch.Tensor) -> torch.Tensor:
            return torch.stack([f[:, y:y + size, x:x + size].mean(dim=(1, 2)) for y in starts for x in starts])
        total += _direct_nt_xent(means(a), means(b), tau)
    return total / len(f1)


def test_local_loss_matches_the_direct_computation():
    generator = torch.Generator().manual_seed(7)
    f1, f2 = torch.randn(2, 3, 5, 5, generator=generator), torch.randn(2, 3, 5, 5, generator=generator)
    loss = local_contrastive_loss(f1, f2, region_size=2, regions_per_axis=3, temperature=0.1)
    # starts along an axis of 5 for 3 regions of 2 pixels: 0, 1.5 → 2 (round half to even), 3
    assert float(loss) == pytest.approx(_direct_local_loss(f1, f2, [0, 2, 3], 2, 0.1), rel=1e-5)


def test_local_loss_by_hand():
    """Two regions per image (1×2 map, 1-pixel regions), identical views, τ = 1: region a = (1, 0), b = (0, 1).

    Each of the 4 anchors has its copy as positive (s = 1) and two orthogonal negatives (s = 0).
    """
    f = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    loss = local_contrastive_loss(f, f, region_size=1, regions_per_axis=2, temperature=1.0)
    assert float(loss) == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)


def test_local_loss_prefers_matching_regions():
    f = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(8))
    aligned = local_contrastive_loss(f, f * 1.1 + 0.01, 2, 3, 0.1)
    shifted = local_contrastive_loss(f, f.roll(3, dims=3), 2, 3, 0.1)
    assert float(aligned) < float(shifted)


def test_local_loss_needs_two_regions():
    with pytest.raises(ValueError, match="at least 2 regions"):
        local_contrastive_loss(torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 3), 3, 4, 0.1)


# ---------------------------------------------------------------- U-Net decoder features

@pytest.mark.parametrize("dims", [2, 3])
def test_bottleneck_helper_matches_the_forward_pass(dims, tiny_context):
    network = tiny_context(dims).build_network().eval()
    captured = {}
    network.encoders[-1].register_forward_hook(lambda module, inputs, output: captured.update(out=output))
    x = torch.randn(2, 1, *SPATIAL[dims])
    with torch.no_grad():
        network(x)
        features = unet_bottleneck(network, x)
    assert features.shape == (2, 16, *(s // 4 for s in SPATIAL[dims]))
    torch.testing.assert_close(features, captured["out"])


@pytest.mark.parametrize("dims", [2, 3])
def test_unet_decoder_features_are_the_decoder_block_outputs(dims, tiny_context):
    network = tiny_context(dims).build_network().eval()
    x = torch.randn(2, 1, *SPATIAL[dims])
    with torch.no_grad():
        logits, penultimate = network(x, return_features=True)
        blocks = network(x, decoder_features=True)
        first_only = network(x, decoder_features=True, decoder_blocks=1)
    assert [tuple(b.shape) for b in blocks] == [(2, 8, *(s // 2 for s in SPATIAL[dims])), (2, 4, *SPATIAL[dims])]
    torch.testing.assert_close(blocks[-1], penultimate)
    torch.testing.assert_close(network.head(blocks[-1]), logits)
    assert len(first_only) == 1
    torch.testing.assert_close(first_only[0], blocks[0])
    with pytest.raises(ValueError, match="decoder_blocks"):
        network(x, decoder_features=True, decoder_blocks=3)


def test_frozen_encoder_gives_the_encoder_no_gradient(tiny_context):
    network = tiny_context(2).build_network()
    features = network(torch.randn(2, 1, 16, 16), decoder_features=True, decoder_blocks=1, frozen_encoder=True)
    features[-1].sum().backward()
    assert all(p.grad is None for p in network.encoders.parameters())
    assert all(p.grad is not None for p in network.decoders[0].parameters())
    assert all(p.grad is None for p in [*network.decoders[1].parameters(), *network.head.parameters()])


# ---------------------------------------------------------------- the method

def test_defaults_pretrain_with_the_papers_best_strategy():
    defaults = ContrastivePretrainParams()
    assert defaults.pretrain_epochs == 10
    assert defaults.strategy == "global_domain+local"
    assert (defaults.temperature, defaults.partitions, defaults.local_region_size) == (0.1, 4, 3)


@pytest.mark.parametrize("params,epoch,phase", [
    ({}, 4.99, "global"), ({}, 5.0, "local"), ({}, 9.9, "local"),
    ({"pretrain_epochs": 8, "local_fraction": 0.25}, 5.9, "global"),
    ({"pretrain_epochs": 8, "local_fraction": 0.25}, 6.0, "local"),
    ({"strategy": "global_domain"}, 9.9, "global"), ({"strategy": "global_random+local"}, 5.5, "local"),
])
def test_pretraining_splits_into_global_then_local_epochs(params, epoch, phase, tiny_context):
    method = build_method("contrastive_pretrain", tiny_context(2), params)
    assert method.progress(0, epoch, 20).stage == "pretrain"
    assert method.pretrain_phase(method.progress(0, epoch, 20)) == phase


def _parameters_with_gradient(module: torch.nn.Module) -> tuple[bool, bool]:
    """(every parameter has a gradient, no parameter has one)."""
    grads = [p.grad for p in module.parameters()]
    return all(g is not None for g in grads), all(g is None for g in grads)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("strategy", ["global_domain+local", "global_random"])
def test_global_stage_trains_the_encoder_and_g1_only(dims, strategy, tiny_context):
    method = build_method("contrastive_pretrain", tiny_context(dims), {"strategy": strategy})
    method.train()
    output = method.pretrain_step(_batch(dims), _progress("pretrain", epoch=1.0))
    loss = output.objectives["main"]
    assert torch.isfinite(loss) and float(output.logs["loss_cons"]) > 0 and output.logs["pretrain_local"] == 0.0
    loss.backward()
    student = method.trained["student"]
    assert _parameters_with_gradient(student.encoders)[0]
    assert any(float(p.grad.abs().sum()) > 0 for p in student.encoders.parameters())
    assert _parameters_with_gradient(method.trained["projection"])[0]
    for untouched in (student.decoders, student.ups, student.head):
        assert _parameters_with_gradient(untouched)[1]
    if "local_projection" in method.trained:
        assert _parameters_with_gradient(method.trained["local_projection"])[1]


@pytest.mark.parametrize("dims", [2, 3])
def test_local_stage_trains_the_first_decoder_blocks_and_g2_only(dims, tiny_context):
    method = build_method("contrastive_pretrain", tiny_context(dims), {})
    method.train()
    output = method.pretrain_step(_batch(dims, positions=False), _progress("pretrain", epoch=5.0))
    loss = output.objectives["main"]
    assert torch.isfinite(loss) and float(loss.detach()) > 0 and output.logs["pretrain_local"] == 1.0
    loss.backward()
    student = method.trained["student"]
    # the tiny U-Net has depth 2: stride 4 is beyond its first decoder block (1/2), which is used
    assert method.local_blocks == 1
    assert _parameters_with_gradient(student.encoders)[1]
    assert _parameters_with_gradient(student.ups[0])[0] and _parameters_with_gradient(student.decoders[0])[0]
    assert any(float(p.grad.abs().sum()) > 0 for p in student.decoders[0].parameters())
    for untouched in (student.ups[1], student.decoders[1], student.head, method.trained["projection"]):
        assert _parameters_with_gradient(untouched)[1]
    assert _parameters_with_gradient(method.trained["local_projection"])[0]


def test_local_stride_picks_the_decoder_block(tiny_context):
    context = tiny_context(2)
    deeper = dataclasses.replace(context, model={**context.model, "depth": 3})
    for stride, blocks, channels in [(1, 3, 4), (2, 2, 8), (4, 1, 16), (8, 1, 16)]:
        method = build_method("contrastive_pretrain", deeper, {"local_feature_stride": stride})
        assert method.local_blocks == blocks
        assert method.trained["local_projection"].net[0].in_channels == channels
    assert "local_projection" not in build_method("contrastive_pretrain", context, {"strategy": "global_domain"}).trained


def test_global_domain_step_uses_the_partitions_of_the_slice_positions(tiny_context):
    """The loss equals G^D on the projections with partitions of [l..., u...] positions (S = 4: 0, 2, 0, 3)."""
    method = build_method("contrastive_pretrain", tiny_context(2), {})
    method.train()
    captured = {}
    method.trained["projection"].register_forward_hook(lambda module, inputs, output: captured.update(z=output))
    loss = method.pretrain_step(_batch(2), _progress("pretrain"))
    z1, z2 = captured["z"].detach().chunk(2)
    expected = _direct_domain_loss(z1, z2, [0, 2, 0, 3], 0.1)
    assert float(loss.objectives["main"].detach()) == pytest.approx(expected, rel=1e-5)
    random = _direct_nt_xent(z1, z2, 0.1)
    assert expected != pytest.approx(random, rel=1e-3)


def test_a_batch_in_one_partition_trains_nothing_and_says_so(tiny_context, caplog):
    """Equal positions (whole 3D volumes get 0 from the sampler): G^D has no negatives, the loss is 0, one warning."""
    method = build_method("contrastive_pretrain", tiny_context(3), {})
    batch = {**_batch(3), "position_l": torch.zeros(2), "position_u": torch.zeros(2)}
    with caplog.at_level("WARNING", logger="semiseg.methods.contrastive_pretrain"):
        first = method.pretrain_step(batch, _progress("pretrain"))
        method.pretrain_step(batch, _progress("pretrain"))
    assert float(first.objectives["main"].detach()) == 0.0 and first.logs["domain_partitions"] == 1.0
    assert len([r for r in caplog.records if "no negatives" in r.message]) == 1
    assert method.pretrain_step(_batch(3), _progress("pretrain")).logs["domain_partitions"] == 3.0


def test_missing_positions_raise_unless_the_strategy_is_random(tiny_context):
    method = build_method("contrastive_pretrain", tiny_context(2), {"strategy": "global_domain"})
    with pytest.raises(KeyError, match="position_l"):
        method.pretrain_step(_batch(2, positions=False), _progress("pretrain"))
    without_u = {k: v for k, v in _batch(2).items() if k != "position_u"}
    with pytest.raises(KeyError, match="position_u"):
        method.pretrain_step(without_u, _progress("pretrain"))
    random = build_method("contrastive_pretrain", tiny_context(2), {"strategy": "global_random+local"})
    output = random.pretrain_step(_batch(2, positions=False), _progress("pretrain"))
    assert torch.isfinite(output.objectives["main"])


def test_the_global_views_are_independent_augmentations_of_every_image(tiny_context):
    method = build_method("contrastive_pretrain", tiny_context(2), {"strategy": "global_random"})
    method.train()
    seen = []
    method.trained["student"].encoders[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    ramp = torch.linspace(-2, 2, 16)
    x, y = ramp.view(1, 16).expand(16, 16), ramp.view(16, 1).expand(16, 16)
    batch = {**_batch(2), "image_l": torch.stack([x, y]).unsqueeze(1), "image_u": torch.stack([-x, -y]).unsqueeze(1)}
    method.pretrain_step(batch, _progress("pretrain"))
    views = seen[0].detach()
    assert views.shape[0] == 2 * (batch["image_l"].shape[0] + batch["image_u"].shape[0])
    first, second = views.chunk(2)
    assert float((first - second).abs().mean()) > 0.05
    correlation = [torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] for a, b in zip(first, second)]
    assert all(float(c) > 0.8 for c in correlation)


@pytest.mark.parametrize("epoch,aligned", [(5.0, True), (1.0, False)])
def test_local_views_differ_only_in_intensity(epoch, aligned, tiny_context):
    """Without noise, a local view is contrast · image + brightness exactly (positions correspond); a global view is not."""
    method = build_method("contrastive_pretrain", tiny_context(2, augment=AugmentSettings(noise_std=0.0)), {})
    method.train()
    seen = []
    method.trained["student"].encoders[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    batch = _batch(2)
    method.pretrain_step(batch, _progress("pretrain", epoch=epoch))
    originals = torch.cat([batch["image_l"], batch["image_u"]])
    views = seen[0].detach()
    for view, original in zip(views, torch.cat([originals, originals])):
        design = torch.stack([original.flatten(), torch.ones(original.numel())], dim=1)
        solution = torch.linalg.lstsq(design, view.flatten().unsqueeze(1)).solution
        residual = float((design @ solution - view.flatten().unsqueeze(1)).abs().max())
        assert (residual < 1e-4) == aligned


def test_fine_tuning_step_trains_the_whole_network_without_the_heads(tiny_context):
    method = build_method("contrastive_pretrain", tiny_context(2), {})
    method.train()
    output = method.training_step(_batch(2, positions=False), _progress("semi", epoch=12.0))
    assert torch.isfinite(output.objectives["main"])
    output.objectives["main"].backward()
    student = method.trained["student"]
    for module in (student.encoders, student.decoders, student.head):
        assert _parameters_with_gradient(module)[0]
    for head in ("projection", "local_projection"):
        assert _parameters_with_gradient(method.trained[head])[1]


def test_projection_dim_sets_the_head_output(tiny_context):
    method = build_method("contrastive_pretrain", tiny_context(2), {"projection_dim": 7})
    assert method.trained["projection"](torch.randn(3, 16, 4, 4)).shape == (3, 7)


def test_state_dict_round_trip(tiny_context):
    source = build_method("contrastive_pretrain", tiny_context(2, seed=0), {})
    target = build_method("contrastive_pretrain", tiny_context(2, seed=1), {})
    target.load_state_dict(source.state_dict())
    for key in ("student", "projection", "local_projection"):
        for a, b in zip(source.trained[key].state_dict().values(), target.trained[key].state_dict().values()):
            torch.testing.assert_close(a, b)


def test_losses_are_computed_in_float32_under_autocast():
    generator = torch.Generator().manual_seed(9)
    z1, z2 = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    f1, f2 = torch.randn(2, 3, 6, 6, generator=generator), torch.randn(2, 3, 6, 6, generator=generator)
    partitions = torch.tensor([0, 0, 1, 2])
    exact = [nt_xent_loss(z1, z2, 0.1), domain_contrastive_loss(z1, z2, partitions, 0.1),
             local_contrastive_loss(f1, f2, 2, 3, 0.1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = [nt_xent_loss(z1, z2, 0.1), domain_contrastive_loss(z1, z2, partitions, 0.1),
                 local_contrastive_loss(f1, f2, 2, 3, 0.1)]
    for a, b in zip(exact, mixed):
        assert b.dtype == torch.float32
        assert float(b) == pytest.approx(float(a), rel=1e-2)
