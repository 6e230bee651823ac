"""Every kind of bad configuration ends a study with exit status 2 and one line, before Ray starts.

The study runs in this process with ``ray.init`` replaced by a function that fails the test
(and Ray reported as not started, as on a user's machine, even when this test session's
integration tests have one running), so reaching Ray at all is a failure; a few cases also run the real script in a subprocess
(:func:`tests.conftest.run_study_without_ray`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.study_runs import RAY_STARTED_EXIT, run_study_without_ray
from semiseg.methods import method_names
from semiseg.methods.registry import method_hparams
from semiseg.tune import run_study

REPO = Path(__file__).resolve().parents[1]


def _study(name: str):
    spec = importlib.util.spec_from_file_location(f"study_{name}", REPO / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.STUDY


EMA_SWEEP = _study("ema_sweep")


@pytest.fixture()
def refused(monkeypatch, capsys, tmp_path):
    """Run ema_sweep with ``argv``; assert exit 2 with one ``error:`` line and no Ray; return the line."""
    import ray

    calls: list[tuple] = []

    def no_ray(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the study reached ray.init")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)

    def run(*argv: str, study=EMA_SWEEP) -> str:
        with pytest.raises(SystemExit) as exit_info:
            run_study(study, ["--storage-path", str(tmp_path / "runs"), *argv])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2, lines
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert calls == [], "the study reached ray.init"
        return lines[0]

    return run


CHOICES = [(name, key) for name in method_names() for key, declared in method_hparams(name).items()
           if declared.choices is not None]


@pytest.mark.parametrize("method,key", CHOICES)
def test_a_bad_choice_of_each_method(refused, method, key):
    line = refused("--set", f"method.name={method}", "--set", f"method.{key}=bogus")
    assert f"method.{key} = 'bogus' is not allowed" in line


@pytest.mark.parametrize("override,message", [
    ("optim.lr=-1", "optim.lr = -1.0 is not allowed: it must be a finite number > 0"),
    ("optim.lr=nan", "optim.lr = nan is not allowed: it must be a finite number > 0"),
    ("optim.lr=inf", "optim.lr = inf is not allowed"),
    ("method.ema_decay=1.5", "method.ema_decay = 1.5 is not allowed: it must be in (0, 1)"),
    ("method.ema_decay=0", "method.ema_decay = 0.0 is not allowed: it must be in (0, 1)"),
    ("method.consistency=-2", "method.consistency = -2.0 is not allowed: it must be a finite number >= 0"),
    ("train.batch_size=0", "train.batch_size = 0 is not allowed: it must be a finite number >= 1"),
    ("train.max_epochs=-3", "train.max_epochs = -3 is not allowed"),
    ("model.dropout=1", "model.dropout = 1.0 is not allowed: it must be in [0, 1)"),
    ("data.num_labelled=0", "data.num_labelled = 0 is not allowed"),
    ("train.augment_rotation_deg=270", "train.augment_rotation_deg = 270.0 is not allowed: it must be in [0, 180]"),
    ("data.dims=4", "data.dims = 4 is not allowed: choose one of 2, 3"),
])
def test_an_out_of_range_value(refused, override, message):
    assert message in refused("--set", override)


@pytest.mark.parametrize("override,message", [
    ("train.max_epochs=2.5", "train.max_epochs = '2.5' is not allowed: it must be an integer"),
    ("optim.lr=abc", "optim.lr = 'abc' is not allowed: it must be a number"),
    ("train.amp=maybe", "train.amp = 'maybe' is not allowed: it must be true or false"),
])
def test_a_value_of_the_wrong_type(refused, override, message):
    assert message in refused("--set", override)


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
    ("method.ema_decy=0.9", "unknown key 'method.ema_decy' (did you mean 'method.ema_decay'?)"),
    ("trian.seed=1", "unknown configuration key 'trian.seed' (did you mean 'train.seed'?)"),
    ("method.name=mean_teachr", "method.name = 'mean_teachr' is not allowed: choose one of"),
])
def test_an_unknown_key_or_method(refused, override, message):
    line = refused("--set", override)
    assert message in line
    if override.startswith("method.name"):
        assert "(did you mean 'mean_teacher'?)" in line


@pytest.mark.parametrize("override,message", [
    ("optim.name=bogus", "optim.name = 'bogus' is not allowed: choose one of adam, adamw, sgd"),
    ("model.name=nope", "model.name = 'nope' is not allowed: choose one of unet, vnet"),
    ("model.name=unett", "(did you mean 'unet'?)"),
    ("model.name=vnet", "V-Net is a 3D network"),
    ("model.norm=layer", "model.norm = 'layer' is not allowed: choose one of batch, instance, group, none"),
    ("optim.lr_schedule=step", "optim.lr_schedule = 'step' is not allowed"),
    ("schedule.rampup_shape=exp", "schedule.rampup_shape = 'exp' is not allowed"),
    ("data.loader=ram", "data.loader = 'ram' is not allowed"),
    ("data.normalisation=zscor", "normalisation"),
    ("data.patch_size=32x32x8", "data.patch_size = '32x32x8' is not allowed: a training patch needs data.dims = 3"),
    ("data.phantom_shape=96x96", "data.phantom_shape = '96x96' is not allowed: it needs three axes"),
    ("data.target_spacing=1x-1x3", "data.target_spacing"),
])
def test_an_unknown_name_or_an_impossible_combination(refused, override, message):
    assert message in refused("--set", override)


def test_a_batch_without_room_for_unlabelled_samples(refused):
    line = refused("--set", "train.batch_size=4", "--set", "train.labelled_per_batch=4")
    assert "train.batch_size = 4 is not allowed: it must be at least train.labelled_per_batch + 1 = 5" in line


def test_a_bad_value_in_a_baseline_is_found_before_ray(refused):
    from dataclasses import replace

    study = replace(EMA_SWEEP, baselines=({"method.name": "supervised", "optim.name": "adamm"},))
    assert "optim.name = 'adamm' is not allowed" in refused(study=study)


@pytest.mark.parametrize("override,message", [
    ("method.consistency_loss=bogus", "method.consistency_loss = 'bogus' is not allowed: choose one of mse, bce"),
    ("optim.name=bogus", "optim.name = 'bogus' is not allowed"),
])
def test_the_study_script_answers_in_one_line_before_any_ray_process(tmp_path, override, message):
    result = run_study_without_ray("ema_sweep.py", "--smoke", "--set", override, tmp_path=tmp_path)
    assert result.returncode == 2, (result.returncode, result.returncode == RAY_STARTED_EXIT, result.stderr)
    assert result.stderr.strip() == f"error: {message}" or message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_a_domain_contrastive_strategy_on_whole_3d_volumes_is_refused(refused):
    line = refused("--set", "method.name=contrastive_pretrain", "--set", "data.dims=3",
                   "--set", "method.strategy=global_domain+local")
    assert "method.strategy = 'global_domain+local' is not allowed with whole 3D volumes" in line
    assert "method.strategy=global_random+local" in line


def test_a_domain_contrastive_strategy_is_allowed_on_slices_and_patches():
    from semiseg.methods.registry import get_method, method_params

    method = get_method("contrastive_pretrain")
    params = method_params("contrastive_pretrain", {"strategy": "global_domain"})
    method.check_setting(params, 2, "")
    method.check_setting(params, 3, "16x16x8")
    method.check_setting(method_params("contrastive_pretrain", {"strategy": "global_random"}), 3, "")
