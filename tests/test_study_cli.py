"""Study scripts: bad input ends with one clear line and exit status 2, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from semiseg.tune.cli import parse_args

REPO = Path(__file__).resolve().parents[1]


def _run_study(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "studies" / "ema_sweep.py"), "--storage-path",
                           str(tmp_path / "runs"), *args], capture_output=True, text=True)


def test_missing_dataset_folder(tmp_path):
    missing = tmp_path / "no_such_dataset"
    result = _run_study("--dataset", str(missing), tmp_path=tmp_path)
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_malformed_dataset_folder(tmp_path):
    folder = tmp_path / "broken"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}}))
    result = _run_study("--dataset", str(folder), tmp_path=tmp_path)
    assert result.returncode == 2
    assert "dataset.json" in result.stderr and "labels" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_override_key(tmp_path):
    result = _run_study("--set", "optim.lrr=1", tmp_path=tmp_path)
    assert result.returncode == 2 and "optim.lrr" in result.stderr and "Traceback" not in result.stderr


def test_shared_cli_defaults_and_validation():
    args = parse_args("x", "y", ["--smoke", "--workers-per-trial", "2", "--set", "optim.lr=1e-3"])
    assert args.smoke and args.workers_per_trial == 2 and args.overrides == (("optim.lr", "1e-3"),)
    assert Path(args.storage_path).is_absolute() and args.state_dir == Path(args.storage_path)
    cloud = parse_args("x", "y", ["--storage-path", "s3://bucket/semiseg"])
    assert cloud.storage_path == "s3://bucket/semiseg", "a URI must not be resolved as a local path"
    assert cloud.state_dir == Path.home() / "semiseg_runs"
    assert parse_args("x", "y", ["--storage-path", "s3://b/p", "--state-dir", "st"]).state_dir.is_absolute()
    with pytest.raises(SystemExit):
        parse_args("x", "y", ["--num-samples", "0"])


def test_methods_option_restricts_a_multi_method_study():
    from semiseg.config import ConfigError
    from semiseg.tune import Study

    study = Study(name="cmp", description="", methods={"mean_teacher": ["ema_decay"], "supervised": [],
                                                        "adversarial": ["adversarial_weight"]},
                  baselines=({"method.name": "supervised"},))
    args = parse_args("x", "y", ["--methods", "supervised, mean_teacher"])
    assert args.methods == ("supervised", "mean_teacher")
    chosen = study.restricted_to(args.methods)
    assert list(chosen.methods) == ["mean_teacher", "supervised"], "the study's order is kept"
    assert chosen.methods["mean_teacher"] == ["ema_decay"] and chosen.baselines == study.baselines
    assert study.restricted_to(()) is study
    with pytest.raises(ConfigError, match="cps not in study 'cmp'.*mean_teacher, supervised, adversarial"):
        study.restricted_to(("cps",))
    with pytest.raises(ConfigError, match="no method table"):
        Study(name="one", description="").restricted_to(("mean_teacher",))


def test_unknown_method_in_methods_option_exits_2(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "studies" / "method_comparison.py"), "--storage-path",
                             str(tmp_path / "runs"), "--methods", "mean_teacher,nope"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "nope not in study 'method_comparison'" in result.stderr
    assert "Traceback" not in result.stderr
