"""Every registered method, in 2D and 3D: one step, its unsupervised term, gradients, state.

Driven by the registry: a new method file is tested here without new test code.
"""

from __future__ import annotations

import math

import pytest
import torch

from semiseg.methods import Progress, build_method, method_names


def _batch(dims: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    spatial = (16, 16) if dims == 2 else (8, 16, 16)
    labels = torch.zeros((2, *spatial), dtype=torch.long)
    labels[(slice(None),) + tuple(slice(s // 4, 3 * s // 4) for s in spatial)] = 1
    image_l = labels[:, None].float() + 0.3 * torch.randn((2, 1, *spatial), generator=gen)
    image_u = (torch.rand((2, 1, *spatial), generator=gen) > 0.5).float() + 0.3 * torch.randn((2, 1, *spatial),
                                                                                             generator=gen)
    return {"image_l": image_l, "label_l": labels, "image_u": image_u,
            "index_l": torch.arange(2), "index_u": torch.arange(2),
            "position_l": torch.tensor([0.1, 0.9]), "position_u": torch.tensor([0.1, 0.6])}


def _progress(stage: str = "semi") -> Progress:
    return Progress(step=5, epoch=3.0, max_epochs=10, stage_epoch=3.0, stage=stage)


CASES = [(name, dims) for name in method_names() for dims in (2, 3)]


def _semi_progress(method) -> Progress:
    """A method that pretrains by default (a pretext or contrastive task) has its unsupervised term in
    its pretraining stage."""
    return _progress("pretrain") if method.params.pretrain_epochs > 0 else _progress()


def _build(name: str, dims: int, tiny_context):
    torch.manual_seed(0)
    return build_method(name, tiny_context(dims), {})


def _step(method, batch):
    """The method's second step, one epoch after its first (temporal ensembling's targets come from past epochs)."""
    method.train()
    progress = _semi_progress(method)
    step = method.pretrain_step if progress.stage == "pretrain" else method.training_step
    step(batch, progress)
    method.end_epoch(2, {})
    return step(batch, progress)


@pytest.mark.parametrize("name,dims", CASES)
def test_one_step_has_finite_objectives(name, dims, tiny_context):
    method = _build(name, dims, tiny_context)
    output = _step(method, _batch(dims))
    assert output.objectives, "a step must return at least one objective"
    assert set(output.objectives) <= set(method.optimizer_groups())
    for key, value in output.objectives.items():
        assert value.ndim == 0 and math.isfinite(float(value.detach())), key


@pytest.mark.parametrize("name,dims", [c for c in CASES if c[0] != "supervised"])
def test_unsupervised_term_is_nonzero_and_trains_only_trained_networks(name, dims, tiny_context):
    method = _build(name, dims, tiny_context)
    output = _step(method, _batch(dims))
    term = output.unsupervised
    assert term is not None, f"{name} must expose its unsupervised term"
    assert abs(float(term.detach())) > 1e-8, f"{name}: unsupervised term is zero (e.g. a teacher compared with itself)"
    trained = [p for module in method.trained.values() for p in module.parameters()]
    grads = torch.autograd.grad(term, trained, allow_unused=True, retain_graph=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads), f"{name}: no gradient to trained nets"
    for key, frozen in method.frozen.items():
        assert all(not p.requires_grad for p in frozen.parameters()), f"{name}: {key} requires grad"


@pytest.mark.parametrize("name,dims", CASES)
def test_state_dict_round_trip(name, dims, tiny_context):
    source = _build(name, dims, tiny_context)
    _step(source, _batch(dims))
    source.after_step(_progress())
    target = build_method(name, tiny_context(dims, seed=7), {})
    target.load_state_dict(source.state_dict())
    x = _batch(dims)["image_l"]
    a, b = source.eval_model().eval(), target.eval_model().eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_registry_knows_the_issue_2_methods_and_rejects_unknown(tiny_context):
    assert {"supervised", "mean_teacher"} <= set(method_names())
    with pytest.raises(KeyError, match="registered"):
        build_method("no_such_method", tiny_context(2), {})
    with pytest.raises(ValueError, match="no hyperparameter"):
        build_method("mean_teacher", tiny_context(2), {"not_a_param": 1})
