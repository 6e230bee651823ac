"""The per-worker training loop without Ray: reports, checkpoints, exact resume, divergence."""

import math

import pytest
import torch

from semiseg.data.prepared import prepare_split
from semiseg.data.source import prepared_cache_root, resolve_dataset
from semiseg.methods import build_method, method_names
from semiseg.methods.registry import experiment_config
from semiseg.train.build import apply_memory_format, build_context
from semiseg.train.loop import run_training
from semiseg.train.session import LocalSession


def test_reports_every_epoch_with_metrics_in_range(tiny_config):
    session = LocalSession()
    state = run_training({**tiny_config, "method.name": "mean_teacher"}, session)
    assert [r["epoch"] for r in session.reports] == [1.0, 2.0]
    for report in session.reports:
        assert 0.0 <= report["val/dice"] <= 1.0
        assert math.isfinite(report["train/loss"]) and report["train/loss"] > 0
        assert report["train/cons_weight"] > 0 and report["diverged"] == 0.0
    assert 0.0 <= session.reports[-1]["test/dice"] <= 1.0
    assert "test/dice" not in session.reports[0]
    assert state.step == 2 * tiny_config["train.steps_per_epoch"]


class _Crash(RuntimeError):
    pass


class _CrashingSession(LocalSession):
    """Dies right after persisting the checkpoint of epoch ``crash_after`` (a killed worker)."""

    def __init__(self, root, crash_after: int) -> None:
        super().__init__(root)
        self.crash_after = crash_after

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if metrics["epoch"] == self.crash_after:
            raise _Crash("worker killed")


def test_resume_continues_from_the_checkpoint_and_matches_an_uninterrupted_run(tiny_config, tmp_path):
    config = {**tiny_config, "method.name": "mean_teacher", "train.max_epochs": 3}
    straight = LocalSession()
    run_training(config, straight)

    with pytest.raises(_Crash):
        run_training(config, _CrashingSession(tmp_path / "ckpt", crash_after=2))
    resumed = LocalSession(tmp_path / "ckpt")
    state = run_training(config, resumed)
    assert [r["epoch"] for r in resumed.reports] == [3.0], "a resumed run must not restart at epoch 1"
    assert state.step == 3 * config["train.steps_per_epoch"]
    assert resumed.reports[0]["train/loss"] == pytest.approx(straight.reports[-1]["train/loss"], rel=1e-6)
    assert resumed.reports[0]["val/dice"] == pytest.approx(straight.reports[-1]["val/dice"], rel=1e-6)
    assert resumed.reports[0]["test/dice"] == pytest.approx(straight.reports[-1]["test/dice"], rel=1e-6)


def test_non_finite_loss_ends_the_trial_as_diverged(tiny_config):
    session = LocalSession()
    state = run_training({**tiny_config, "method.name": "supervised", "optim.lr": 1e30,
                          "optim.grad_clip": 0.0, "train.max_epochs": 4}, session)
    assert state.diverged
    assert session.reports[-1]["diverged"] == 1.0
    assert session.reports[-1]["val/dice"] == 0.0, "every report carries the study metric"
    assert len(session.reports) < 4


def test_pretraining_stage_precedes_the_semi_supervised_stage(tiny_config):
    session = LocalSession()
    run_training({**tiny_config, "method.name": "mean_teacher", "method.pretrain_epochs": 1}, session)
    first, second = session.reports
    assert first["train/pretraining"] == 1.0 and "train/loss_cons" not in first
    assert second["train/pretraining"] == 0.0 and second["train/loss_cons"] > 0


def test_3d_vnet_trains_on_patches_and_validates_whole_cases(tiny_config):
    session = LocalSession()
    config = {**tiny_config, "data.phantom_shape": "32x32x16", "data.dims": 3, "data.patch_size": "16x16x8",
              "model.name": "vnet", "train.batch_size": 2, "train.labelled_per_batch": 1,
              "method.name": "mean_teacher", "train.val_batch_size": 4}
    run_training(config, session)
    assert [r["epoch"] for r in session.reports] == [1.0, 2.0]
    assert all(0.0 <= r["val/dice"] <= 1.0 for r in session.reports)
    assert session.reports[-1]["val/hd95_nan_cases"] >= 0


def test_patch_size_needs_3d(tiny_config):
    from semiseg.config import ConfigError

    with pytest.raises(ConfigError, match="data.dims=3"):
        run_training({**tiny_config, "data.patch_size": "16x16x8"}, LocalSession())


def test_checkpoints_carry_the_best_overlay_and_model_spec(tiny_config, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    session = LocalSession(tmp_path / "ckpt")
    run_training({**tiny_config, "method.name": "supervised"}, session)
    folder = session.latest
    image = np.asarray(Image.open(io.BytesIO((folder / "overlay.png").read_bytes())))
    assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 0
    assert image.shape[0] * 3 < image.shape[1] * 1.2, "three panels side by side"
    payload = torch.load(folder / "state.pt", weights_only=True)
    assert payload["model_spec"]["num_classes"] == 2 and payload["model_spec"]["in_channels"] == 1


def _plain_types(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_types(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain_types(v) for v in value)
    return value is None or type(value) in (bool, int, float, str)


@pytest.mark.parametrize("method", method_names())
def test_every_methods_checkpoint_loads_with_weights_only(tiny_config, tmp_path, method):
    """Checkpoints may sit in shared storage: loading one must not run code (no pickled classes in it)."""
    session = LocalSession(tmp_path / "ckpt")
    run_training({**tiny_config, "method.name": method, "train.max_epochs": 1}, session)
    path = session.latest / "state.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["torch_rng"].dtype == torch.uint8
    assert _plain_types(payload["loop"]) and _plain_types(payload["model_spec"])
    assert payload["loop"]["history"] and all(type(v) in (int, float) for v in payload["loop"]["history"][0].values())
    from semiseg.models.evaluation import build_evaluation_network

    network = build_evaluation_network(payload["model_spec"])
    network.load_state_dict(payload["best_eval_state"])
    assert sum(p.numel() for p in network.parameters()) == sum(
        t.numel() for k, t in payload["best_eval_state"].items() if not k.endswith(("running_mean", "running_var",
                                                                                     "num_batches_tracked")))


def test_numpy_metrics_are_saved_as_plain_numbers():
    import numpy as np

    from semiseg.train.checkpoint import plain as _plain

    saved = _plain({"history": [{"val/hd95": np.float64(2.5), "epoch": np.int64(1)}], "shape": (np.int32(4), 2)})
    assert saved == {"history": [{"val/hd95": 2.5, "epoch": 1}], "shape": (4, 2)} and _plain_types(saved)


@pytest.mark.parametrize(("overrides", "layout"), [
    ({"method.name": "mean_teacher"}, torch.channels_last),
    ({"method.name": "supervised", "data.phantom_shape": "32x32x16", "data.dims": 3, "data.patch_size": "16x16x8"},
     torch.channels_last_3d)])
def test_channels_last_is_the_default_and_trains_the_same_model(tiny_config, overrides, layout):
    config = experiment_config({**tiny_config, **overrides})
    assert config.train.channels_last, "channels-last is the default layout"
    data = prepare_split(resolve_dataset(config.data), num_labelled=config.data.num_labelled,
                         num_validation=config.data.num_validation, num_test=config.data.num_test,
                         split_seed=config.data.split_seed, dims=config.data.dims,
                         cache_root=prepared_cache_root(config.data))
    method = build_method(config.method["name"], build_context(config, data, torch.device("cpu")), config.method)
    apply_memory_format(method, config)
    weights = [p for module in [*method.trained.values(), *method.frozen.values()] for p in module.parameters()
               if p.ndim == config.data.dims + 2]
    assert weights and all(w.is_contiguous(memory_format=layout) for w in weights)
    assert sum(not w.is_contiguous() for w in weights) > len(weights) // 2, "most weights changed layout"
    contiguous, channels_last = LocalSession(), LocalSession()
    run_config = {**tiny_config, **overrides, "train.max_epochs": 1}
    run_training({**run_config, "train.channels_last": False}, contiguous)
    run_training(run_config, channels_last)
    assert channels_last.reports[0]["train/loss"] == pytest.approx(contiguous.reports[0]["train/loss"], rel=1e-3)
    assert channels_last.reports[0]["val/dice"] == pytest.approx(contiguous.reports[0]["val/dice"], abs=1e-3)
