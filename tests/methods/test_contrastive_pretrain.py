"""Global contrastive pretraining (Chaitanya et al. 2020): NT-Xent, encoder helper, the method."""

from __future__ import annotations

import math

import pytest
import torch

from semiseg.components.contrastive import nt_xent_loss, unet_bottleneck
from semiseg.methods import Progress, build_method

SPATIAL = {2: (16, 16), 3: (8, 16, 16)}


def _batch(dims: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    spatial = SPATIAL[dims]
    labels = torch.zeros((2, *spatial), dtype=torch.long)
    labels[(slice(None), *(slice(s // 4, 3 * s // 4) for s in spatial))] = 1
    return {"image_l": torch.randn((2, 1, *spatial), generator=generator),
            "label_l": labels,
            "image_u": torch.randn((2, 1, *spatial), generator=generator)}


def _progress(stage: str) -> Progress:
    return Progress(step=0, epoch=0.0, max_epochs=2, stage=stage)


def _direct_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    z = torch.cat([z1, z2]).tolist()
    n = len(z1)

    def sim(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denominator = sum(math.exp(sim(z[i], z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sim(z[i], z[j]) / tau) / denominator)
    return total / (2 * n)


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
def test_pretrain_step_trains_the_encoder_and_head_but_not_the_decoder(dims, tiny_context):
    method = build_method("contrastive_pretrain", tiny_context(dims), {"pretrain_epochs": 1})
    method.train()
    output = method.pretrain_step(_batch(dims), _progress("pretrain"))
    loss = output.objectives["main"]
    assert torch.isfinite(loss)
    assert float(output.logs["loss_cons"]) > 0
    student = method.trained["student"]
    loss.backward()
    assert all(p.grad is not None for p in student.encoders.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in student.encoders.parameters())
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0
               for p in method.trained["projection"].parameters())
    untouched = [*student.decoders.parameters(), *student.ups.parameters(), *student.head.parameters()]
    assert all(p.grad is None for p in untouched)


def test_the_two_views_are_independent_augmentations_of_every_image(tiny_context):
    method = build_method("contrastive_pretrain", tiny_context(2), {"pretrain_epochs": 1})
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


def test_fine_tuning_step_trains_the_whole_network_without_the_head(tiny_context):
    method = build_method("contrastive_pretrain", tiny_context(2), {"pretrain_epochs": 1})
    method.train()
    output = method.training_step(_batch(2), _progress("semi"))
    assert torch.isfinite(output.objectives["main"])
    output.objectives["main"].backward()
    student = method.trained["student"]
    assert all(p.grad is not None for p in student.head.parameters())
    assert all(p.grad is not None for p in student.decoders.parameters())
    assert all(p.grad is None for p in method.trained["projection"].parameters())


def test_projection_dim_sets_the_head_output(tiny_context):
    method = build_method("contrastive_pretrain", tiny_context(2), {"projection_dim": 7})
    assert method.trained["projection"](torch.randn(3, 16, 4, 4)).shape == (3, 7)


def test_state_dict_round_trip(tiny_context):
    source = build_method("contrastive_pretrain", tiny_context(2, seed=0), {})
    target = build_method("contrastive_pretrain", tiny_context(2, seed=1), {})
    target.load_state_dict(source.state_dict())
    for key in ("student", "projection"):
        for a, b in zip(source.trained[key].state_dict().values(), target.trained[key].state_dict().values()):
            torch.testing.assert_close(a, b)
