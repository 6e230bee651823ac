"""Temporal ensembling: the bias-corrected ensemble, once-per-epoch updates, masking, gradients, exact resume."""

from __future__ import annotations

import pytest
import torch

from semiseg.augment import AugmentSettings, identity_affine, sample_affine, valid_mask, warp
from semiseg.components.sample_ensemble import SampleEnsemble
from semiseg.methods import Progress, build_method
from semiseg.components.alignment import invert_affine as inverse_affine

NO_AUGMENT = AugmentSettings(rotation_deg=0.0, scale=0.0, shift=0.0, noise_std=0.0, intensity=0.0)
PROGRESS = Progress(step=0, epoch=3.0, max_epochs=10, stage_epoch=3.0)


def _batch(dims: int = 2, n_l: int = 2, n_u: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    spatial = (16, 16) if dims == 2 else (8, 8, 8)
    labels = torch.zeros((n_l, *spatial), dtype=torch.long)
    labels[(slice(None), *(slice(s // 4, 3 * s // 4) for s in spatial))] = 1
    return {"image_l": labels[:, None].float() + 0.3 * torch.randn((n_l, 1, *spatial), generator=gen),
            "label_l": labels, "image_u": torch.randn((n_u, 1, *spatial), generator=gen),
            "index_l": torch.arange(n_l), "index_u": torch.arange(10, 10 + n_u)}


def _constant(value: float, shape=(1, 2, 2, 2)) -> torch.Tensor:
    return torch.full(shape, value)


def test_bias_corrected_target_after_one_and_two_updates():
    ensemble = SampleEnsemble(0.6, num_classes=2)
    key, everywhere = torch.tensor([7]), torch.ones((1, 1, 2, 2))
    ensemble.accumulate(key, None, _constant(0.2), everywhere)
    ensemble.update()
    target, known = ensemble.targets(key, None, (2, 2))
    # Z = 0.4 * 0.2 = 0.08; corrected by 1 - 0.6 = 0.4: 0.2.
    torch.testing.assert_close(ensemble.averages[7], _constant(0.08)[0])
    torch.testing.assert_close(target, _constant(0.2))
    assert bool(known.all())
    ensemble.accumulate(key, None, _constant(0.8), everywhere)
    ensemble.update()
    target, _ = ensemble.targets(key, None, (2, 2))
    # Z = 0.6 * 0.08 + 0.4 * 0.8 = 0.368; corrected by 1 - 0.36 = 0.64: 0.575.
    torch.testing.assert_close(ensemble.averages[7], _constant(0.368)[0])
    torch.testing.assert_close(target, _constant(0.575))


def test_one_update_per_epoch_with_the_mean_of_the_epochs_predictions():
    ensemble = SampleEnsemble(0.5, num_classes=1)
    key = torch.tensor([3])
    for value in (0.2, 0.6):
        ensemble.accumulate(key, None, _constant(value, (1, 1, 2, 2)), torch.ones((1, 1, 2, 2)))
    assert 3 in ensemble.sums and not bool(ensemble.updates[3].any()), "nothing is folded in before the epoch ends"
    assert ensemble.update() == 1
    assert bool((ensemble.updates[3] == 1).all()), "seen twice in one epoch, updated once"
    torch.testing.assert_close(ensemble.averages[3], torch.full((1, 2, 2), 0.5 * 0.4))
    assert ensemble.update() == 0
    assert bool((ensemble.updates[3] == 1).all()), "an epoch that does not see a sample leaves it as it is"


def test_windows_update_only_the_voxels_they_cover_and_grow_the_sample():
    ensemble = SampleEnsemble(0.6, num_classes=1)
    key = torch.tensor([0])
    covered = torch.ones((1, 1, 2, 2, 2))
    covered[0, 0, 0] = 0
    ensemble.accumulate(key, torch.tensor([[1, 2, 0]]), _constant(1.0, (1, 1, 2, 2, 2)), covered)
    ensemble.update()
    assert tuple(ensemble.updates[0].shape) == (3, 4, 2)
    assert int(ensemble.updates[0].sum()) == 4 and bool((ensemble.updates[0][2, 2:4, 0:2] == 1).all())
    target, known = ensemble.targets(key, torch.tensor([[0, 0, 0]]), (3, 4, 2))
    assert int(known.sum()) == 4 and float(target.max()) == pytest.approx(1.0)


def test_inverse_affine_undoes_the_warp():
    theta = sample_affine(3, 2, AugmentSettings(), torch.Generator().manual_seed(0), shape=(24, 24))
    rows, columns = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    x = torch.stack([0.03 * rows + 0.02 * columns, 1.0 - 0.01 * rows]).expand(3, 2, 24, 24)  # bilinear is exact
    inverse = inverse_affine(theta)
    back = warp(warp(x, theta), inverse)
    inside = valid_mask(x, inverse) * warp(valid_mask(x, theta), inverse).gt(0.999).float()
    assert float(inside.mean()) > 0.5
    assert float(((back - x).abs() * inside).max()) < 1e-4
    torch.testing.assert_close(inverse_affine(inverse), theta, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inverse_affine(identity_affine(2, 3)), identity_affine(2, 3))


def test_samples_without_a_target_give_no_loss_and_no_gradient(tiny_context):
    method = build_method("temporal_ensembling", tiny_context(2), {})
    method.train()
    output = method.training_step(_batch(), PROGRESS)
    assert float(output.unsupervised.detach()) == 0.0 and output.logs["target_fraction"] == 0.0
    grads = torch.autograd.grad(output.unsupervised, list(method.trained["student"].parameters()), allow_unused=True)
    assert all(g is None or float(g.abs().sum()) == 0.0 for g in grads)
    assert set(method.ensembles["u"].sums) == {10, 11} and set(method.ensembles["l"].sums) == {0, 1}


def test_consistency_is_the_class_summed_mse_to_the_target_and_trains_the_student(tiny_context):
    method = build_method("temporal_ensembling", tiny_context(2, dropout=0.0, augment=NO_AUGMENT),
                          {"cons_on": "unlabelled"})
    assert set(method.ensembles) == {"u"}
    batch = _batch()
    fixed = torch.rand((2, 2, 16, 16), generator=torch.Generator().manual_seed(5))
    method.ensembles["u"].accumulate(batch["index_u"], None, fixed, torch.ones((2, 1, 16, 16)))
    method.ensembles["u"].update()
    method.train()
    output = method.training_step(batch, PROGRESS)
    student = method.trained["student"](torch.cat([batch["image_l"], batch["image_u"]]))[2:].softmax(dim=1)
    expected = ((student - fixed) ** 2).sum(dim=1).mean()
    assert float(output.unsupervised) == pytest.approx(float(expected), rel=1e-4)
    assert output.logs["target_fraction"] == 1.0
    assert float(output.objectives["main"]) == pytest.approx(
        float(output.logs["loss_sup"]) + 3.0 * float(expected), rel=1e-4)
    grads = torch.autograd.grad(output.unsupervised, list(method.trained["student"].parameters()))
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_ensemble_is_read_in_the_students_augmented_frame(tiny_context):
    method = build_method("temporal_ensembling", tiny_context(2, dropout=0.0), {"cons_on": "unlabelled"})
    batch = _batch(n_u=1)
    left_half = torch.zeros((1, 2, 16, 16))
    left_half[:, 1, :8] = 1.0
    left_half[:, 0, 8:] = 1.0
    method.ensembles["u"].accumulate(batch["index_u"], None, left_half, torch.ones((1, 1, 16, 16)))
    method.ensembles["u"].update()
    generator_state = method.generator.get_state()
    augmented = method.augment_batch(batch)
    method.generator.set_state(generator_state)
    method.train()
    output = method.training_step(batch, PROGRESS)
    theta = augmented.theta[2:]
    student = method.trained["student"](augmented.images)[2:].softmax(dim=1)
    target = warp(left_half, theta)
    mask = valid_mask(target, theta).squeeze(1)
    expected = (((student - target) ** 2).sum(dim=1) * mask).sum() / mask.sum()
    assert float(output.unsupervised) == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_after_an_epoch_the_term_is_nonzero_in_2d_and_3d(tiny_context, dims):
    method = build_method("temporal_ensembling", tiny_context(dims), {})
    batch = _batch(dims)
    method.train()
    method.training_step(batch, PROGRESS)
    method.end_epoch(0, {})
    output = method.training_step(batch, PROGRESS)
    assert float(output.unsupervised) > 0 and 0 < output.logs["target_fraction"] <= 1
    assert all(bool((e.updates[k] <= 1).all()) for e in method.ensembles.values() for k in e.updates)


def test_a_batch_that_does_not_name_its_samples_is_refused(tiny_context):
    method = build_method("temporal_ensembling", tiny_context(2), {})
    batch = {k: v for k, v in _batch().items() if k != "index_u"}
    with pytest.raises(ValueError, match="index_u"):
        method.training_step(batch, PROGRESS)


def test_state_round_trip_keeps_the_ensembles_and_the_unfinished_epoch(tiny_context):
    source = build_method("temporal_ensembling", tiny_context(2), {})
    source.train()
    source.training_step(_batch(), PROGRESS)
    source.end_epoch(0, {})
    source.training_step(_batch(), PROGRESS)
    target = build_method("temporal_ensembling", tiny_context(2, seed=4), {})
    target.load_state_dict(source.state_dict())
    for part in ("l", "u"):
        a, b = source.ensembles[part], target.ensembles[part]
        assert a.averages.keys() == b.averages.keys() and a.sums.keys() == b.sums.keys()
        for key in a.averages:
            assert torch.equal(a.averages[key], b.averages[key]) and torch.equal(a.updates[key], b.updates[key])
        for key in a.sums:
            assert torch.equal(a.sums[key], b.sums[key]) and torch.equal(a.counts[key], b.counts[key])


def test_memory_per_thousand_slices_is_as_documented():
    ensemble = SampleEnsemble(0.6, num_classes=2)
    ensemble.accumulate(torch.tensor([0]), None, torch.zeros((1, 2, 256, 256)), torch.ones((1, 1, 256, 256)))
    during_epoch = ensemble.nbytes()
    ensemble.update()
    assert ensemble.nbytes() * 1000 == pytest.approx(655e6, rel=0.01)
    assert (during_epoch - ensemble.nbytes()) * 1000 == pytest.approx(786e6, rel=0.01)


class _Crash(RuntimeError):
    pass


def _final_state(folder):
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=True)["method"]


@pytest.mark.parametrize("overrides", [{}, {"data.phantom_shape": "32x32x16", "data.dims": 3,
                                            "data.patch_size": "16x16x8", "model.name": "vnet",
                                            "train.val_batch_size": 4}], ids=["2d", "3d_patches"])
def test_resumed_trial_equals_an_uninterrupted_one_ensembles_included(tiny_config, tmp_path, overrides):
    from semiseg.train.loop import run_training
    from semiseg.train.session import LocalSession

    class CrashingSession(LocalSession):
        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            if metrics["epoch"] == 1:
                raise _Crash("worker killed")

    config = {**tiny_config, **overrides, "method.name": "temporal_ensembling", "train.evaluate_test": False,
              "schedule.rampup_epochs": 0.0}
    straight = LocalSession(tmp_path / "straight")
    run_training(config, straight)
    with pytest.raises(_Crash):
        run_training(config, CrashingSession(tmp_path / "resumed"))
    resumed = LocalSession(tmp_path / "resumed")
    run_training(config, resumed)
    assert [r["epoch"] for r in resumed.reports] == [2.0]
    assert resumed.reports[0]["train/loss_cons"] > 0, "the second epoch trains on the first epoch's ensembles"
    a, b = _final_state(straight.latest), _final_state(resumed.latest)
    for key, value in a["trained.student"].items():
        assert torch.equal(value, b["trained.student"][key]), key
    for part in ("labelled", "unlabelled"):
        x, y = a["extra"][part], b["extra"][part]
        assert torch.equal(x["keys"], y["keys"]) and len(x["keys"]) > 0
        assert all(torch.equal(p, q) for p, q in zip(x["averages"], y["averages"]))
        assert all(torch.equal(p, q) for p, q in zip(x["updates"], y["updates"]))
        updates = torch.stack([u.max() for u in x["updates"]])
        assert int(updates.max()) <= 2 and int(updates.min()) >= 1, "at most one update per sample and epoch"
        assert len(x["pending_keys"]) == 0, "every epoch's predictions are folded in at its end"
