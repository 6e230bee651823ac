"""``semiseg-predict`` and where it finds models (semiseg.inference.predict_cli, semiseg.inference.sources).

A study folder is written by hand (``models/index.json`` and tiny bundles); MLflow sources run
against a real local SQLite store in a temporary folder, the bundle logged as a run's artifact
``semiseg_model/model.pt`` and registered as a model version of that run.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from semiseg.inference import predict_cli
from semiseg.inference.bundle import ModelBundle, load_bundle
from semiseg.inference.sources import ModelSourceError, resolve_model
from tests.test_predictor import CLASS_IDS, INPUT_SHAPE, make_bundle, write_case

METHOD_MODELS = [
    # path under models/, method, phase, seed, split, val_dice
    ("supervised/search-1", "supervised", "search-1", 0, 0, 0.70),
    ("mean_teacher/search-3", "mean_teacher", "search-1", 0, 0, 0.75),
    ("mean_teacher/final-s1-p0", "mean_teacher", "final", 1, 0, 0.80),
    ("mean_teacher/final-s0-p1", "mean_teacher", "final", 0, 1, 0.79),
    ("mean_teacher/final-s0-p0", "mean_teacher", "final", 0, 0, 0.78),
]


def write_study(state: Path, name: str = "sweep", models=METHOD_MODELS) -> Path:
    """A study folder with 3D two-channel bundles and its ``models/index.json``."""
    study = state / name
    entries = []
    for number, (folder, method, phase, seed, split, dice) in enumerate(models):
        path = f"models/{folder}/model.pt"
        make_bundle(study / path, 3, seed=10 * number + seed, in_channels=2,
                    info={"method": method, "phase": phase, "seed": seed, "split": split, "val_dice": dice})
        entries.append({"path": path, "method": method, "group": method, "phase": phase, "seed": seed,
                        "split": split, "val_dice": dice})
    best = {"supervised": "models/supervised/search-1/model.pt",
            "mean_teacher": "models/mean_teacher/final-s1-p0/model.pt"}
    (study / "models" / "index.json").write_text(json.dumps({"study": name, "best": best, "models": entries}))
    return study


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return write_study(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scans")
    for number, case in enumerate(["p01", "p02"]):
        write_case(folder, case, channels=2, seed=number)
    return folder


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = predict_cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


# ---------------------------------------------------------------- study folders


def test_a_study_folder_gives_its_best_model_or_its_final_phase(study):
    assert resolve_model(str(study)) == [study / "models/mean_teacher/final-s1-p0/model.pt"]
    assert resolve_model(str(study), method="supervised") == [study / "models/supervised/search-1/model.pt"]
    assert resolve_model(str(study), ensemble=True) == [
        study / "models/mean_teacher/final-s0-p0/model.pt", study / "models/mean_teacher/final-s1-p0/model.pt",
        study / "models/mean_teacher/final-s0-p1/model.pt"]
    assert resolve_model(str(study.parent)) == resolve_model(str(study))
    with pytest.raises(ModelSourceError, match="final phase did not run for supervised"):
        resolve_model(str(study), method="supervised", ensemble=True)
    with pytest.raises(ModelSourceError, match="no model of method 'unet'; its methods: mean_teacher, supervised"):
        resolve_model(str(study), method="unet")


def test_the_best_method_is_the_highest_validation_dice_among_the_best_entries(tmp_path):
    models = [("a/m", "alpha", "final", 0, 0, 0.6), ("b/m", "beta", "search-1", 0, 0, 0.9)]
    study = tmp_path / "s"
    (study / "models").mkdir(parents=True)
    for folder, *_ in models:
        (study / "models" / folder).mkdir(parents=True)
        (study / "models" / folder / "model.pt").write_bytes(b"")
    index = {"study": "s", "best": {"alpha": "models/a/m/model.pt", "beta": "models/b/m/model.pt"},
             "models": [{"path": f"models/{f}/model.pt", "method": m, "phase": p, "seed": s, "split": q,
                         "val_dice": d} for f, m, p, s, q, d in models]}
    (study / "models" / "index.json").write_text(json.dumps(index))
    assert resolve_model(str(study)) == [study / "models/b/m/model.pt"]
    index["models"][1]["val_dice"] = float("nan")
    (study / "models" / "index.json").write_text(json.dumps(index))
    assert resolve_model(str(study)) == [study / "models/a/m/model.pt"]
    (study / "models/a/m/model.pt").unlink()
    with pytest.raises(ModelSourceError, match=r"listed in models/index.json are missing: .*a/m/model.pt"):
        resolve_model(str(study))


def test_a_state_folder_must_hold_exactly_one_study(tmp_path):
    for name in ("one", "two"):
        (tmp_path / name / "models").mkdir(parents=True)
        (tmp_path / name / "models" / "index.json").write_text(json.dumps({"best": {}, "models": []}))
    with pytest.raises(ModelSourceError, match=r"holds several studies \(one, two\); pass one of their folders"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelSourceError, match=r"one/models/index.json: names no best model"):
        resolve_model(str(tmp_path / "one"))
    (tmp_path / "one" / "models" / "index.json").write_text("{not json")
    with pytest.raises(ModelSourceError, match="is not a readable JSON model index"):
        resolve_model(str(tmp_path / "one"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="holds no models/index.json, no study folder"):
        resolve_model(str(tmp_path / "empty"))


def test_a_model_file_is_one_model(tmp_path):
    path = make_bundle(tmp_path / "model.pt", 2, seed=0)
    assert resolve_model(str(path)) == [path]
    assert resolve_model(str(tmp_path)) == [path]
    with pytest.raises(ModelSourceError, match="--method and --ensemble choose among a study's models"):
        resolve_model(str(path), ensemble=True)


# ---------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A SQLite MLflow store with one run holding a bundle, registered as version 1 (alias ``champion``)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    bundle = make_bundle(root / "upload" / "model.pt", 3, seed=5, in_channels=2, info={"method": "supervised"})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("predict", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifact(run_id, str(bundle), artifact_path="semiseg_model")
    client.set_terminated(run_id)
    client.create_registered_model("semiseg-test-supervised")
    version = client.create_model_version("semiseg-test-supervised", f"runs:/{run_id}/semiseg_model", run_id=run_id)
    client.set_registered_model_alias("semiseg-test-supervised", "champion", version.version)
    return {"uri": uri, "run_id": run_id, "bundle": bundle, "version": version}


def _same_bundle(resolved, expected: Path) -> ModelBundle:
    assert len(resolved) == 1 and isinstance(resolved[0], ModelBundle)
    reference = load_bundle(expected)
    assert resolved[0].spec == reference.spec and resolved[0].info == reference.info
    assert all(torch.equal(resolved[0].state[k], v) for k, v in reference.state.items())
    return resolved[0]


def test_runs_and_registered_models_are_downloaded(mlflow_store, monkeypatch):
    uri, run_id, expected = mlflow_store["uri"], mlflow_store["run_id"], mlflow_store["bundle"]
    assert mlflow_store["version"].run_id == run_id
    bundle = _same_bundle(resolve_model(f"runs:/{run_id}", tracking_uri=uri), expected)
    assert bundle.source == f"runs:/{run_id}/semiseg_model/model.pt"
    _same_bundle(resolve_model(f"runs:/{run_id}/semiseg_model", tracking_uri=uri), expected)
    assert _same_bundle(resolve_model("models:/semiseg-test-supervised/1", tracking_uri=uri),
                        expected).source == "models:/semiseg-test-supervised/1"
    _same_bundle(resolve_model("models:/semiseg-test-supervised@champion", tracking_uri=uri), expected)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    _same_bundle(resolve_model(f"runs:/{run_id}"), expected)


def test_mlflow_sources_explain_what_is_wrong(mlflow_store, monkeypatch):
    uri, run_id = mlflow_store["uri"], mlflow_store["run_id"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ModelSourceError, match="needs an MLflow tracking URI: pass --tracking-uri or set MLFLOW"):
        resolve_model(f"runs:/{run_id}")
    with pytest.raises(ModelSourceError, match=r"models:/semiseg-test-supervised/7: .*not found"):
        resolve_model("models:/semiseg-test-supervised/7", tracking_uri=uri)
    with pytest.raises(ModelSourceError, match=r"models:/nothing@best: .*not found"):
        resolve_model("models:/nothing@best", tracking_uri=uri)
    with pytest.raises(ModelSourceError, match="expected models:/<name>/<version number>"):
        resolve_model("models:/semiseg-test-supervised", tracking_uri=uri)
    with pytest.raises(ModelSourceError, match=rf"cannot download weights/model.pt of run {run_id}"):
        resolve_model(f"runs:/{run_id}/weights/model.pt", tracking_uri=uri)
    with pytest.raises(ModelSourceError, match="run 0123456789abcdef"):
        resolve_model("runs:/0123456789abcdef", tracking_uri=uri)
    with pytest.raises(ModelSourceError, match="is one model"):
        resolve_model(f"runs:/{run_id}", method="supervised", tracking_uri=uri)


def test_predict_from_a_registered_model_matches_its_file(mlflow_store, inputs, tmp_path, capsys):
    code, out, err = run(capsys, "--model", "models:/semiseg-test-supervised@champion", "--input", inputs,
                         "--output", tmp_path / "registry", "--tracking-uri", mlflow_store["uri"], "--device", "cpu")
    assert code == 0, err
    assert "models:/semiseg-test-supervised@champion" in out
    assert "Downloading artifacts" not in err
    code, _, err = run(capsys, "--model", mlflow_store["bundle"], "--input", inputs, "--output", tmp_path / "file")
    assert code == 0, err
    for case in ("p01", "p02"):
        assert np.array_equal(labels_of(tmp_path / "registry" / f"{case}.nii.gz"),
                              labels_of(tmp_path / "file" / f"{case}.nii.gz"))


# ---------------------------------------------------------------- the command


def test_predict_an_ensemble_of_the_final_phase(study, inputs, tmp_path, capsys):
    code, out, err = run(capsys, "--model", study, "--input", inputs, "--output", tmp_path / "ensemble",
                         "--ensemble", "--save-probabilities", "--batch-size", "3")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "ensemble").iterdir()) == [
        "p01.nii.gz", "p01.npz", "p02.nii.gz", "p02.npz"]
    for case in ("p01", "p02"):
        written = nib.load(tmp_path / "ensemble" / f"{case}.nii.gz")
        reference = nib.load(inputs / f"{case}_0000.nii.gz")
        assert written.shape == reference.shape == INPUT_SHAPE
        assert np.array_equal(written.affine, reference.affine)
        assert set(np.unique(labels_of(tmp_path / "ensemble" / f"{case}.nii.gz"))) <= set(CLASS_IDS)
    lines = out.splitlines()
    assert lines[0] == f"2 case(s) written to {(tmp_path / 'ensemble').resolve()}"
    assert lines[1] == "models (ensemble of 3):"
    assert [line.split("  [")[0].strip() for line in lines[2:5]] == [
        "mean_teacher (seed 0, split 0)", "mean_teacher (seed 1, split 0)", "mean_teacher (seed 0, split 1)"]
    assert lines[-2] == "test-time augmentation: none"
    assert lines[-1].startswith("post-processing (the choice stored with the model): none")
    members = []
    for number, folder in enumerate(["final-s0-p0", "final-s1-p0", "final-s0-p1"]):
        code, _, err = run(capsys, "--model", study / "models/mean_teacher" / folder / "model.pt", "--input", inputs,
                           "--output", tmp_path / f"member{number}", "--save-probabilities")
        assert code == 0, err
        members.append(np.load(tmp_path / f"member{number}" / "p02.npz")["probabilities"])
    ensemble = np.load(tmp_path / "ensemble" / "p02.npz")["probabilities"]
    assert np.allclose(ensemble, np.mean(members, axis=0), atol=1e-5)


def test_mirror_tta_and_lcc_are_reported(study, inputs, tmp_path, capsys):
    code, out, err = run(capsys, "--model", study, "--method", "supervised", "--input", inputs, "--output",
                         tmp_path / "out", "--tta", "mirror", "--postprocess", "lcc")
    assert code == 0, err
    assert "supervised (seed 0, split 0)" in out
    assert "test-time augmentation: mirror (8 mirrorings)" in out
    assert "post-processing (--postprocess lcc): largest component kept for: a, b, c" in out


@pytest.fixture()
def no_networks(monkeypatch):
    """Fail the test if a network is built: every check must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a network was built before the request was checked")

    monkeypatch.setattr(predict_cli, "build_network", refuse)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    assert "Traceback" not in err
    return lines[0]


def test_a_bad_model_is_one_error_line(study, inputs, tmp_path, capsys, no_networks):
    code, out, err = run(capsys, "--model", tmp_path / "nowhere", "--input", inputs, "--output", tmp_path / "out")
    assert code == 2 and out == ""
    assert f"--model {tmp_path / 'nowhere'}: no such file or folder" in _one_error_line(err)
    garbage = tmp_path / "weights.pt"
    garbage.write_text("hello")
    code, _, err = run(capsys, "--model", garbage, "--input", inputs, "--output", tmp_path / "out")
    assert code == 2 and f"{garbage} is not a readable model bundle" in _one_error_line(err)
    code, _, err = run(capsys, "--model", study, "--method", "supervised", "--ensemble", "--input", inputs,
                       "--output", tmp_path / "out")
    assert code == 2 and "final phase did not run for supervised" in _one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_wrong_channels_and_empty_inputs_are_named(study, tmp_path, capsys, no_networks):
    one_channel = tmp_path / "t1_only"
    write_case(one_channel, "p09", channels=1, seed=0)
    code, _, err = run(capsys, "--model", study, "--input", one_channel, "--output", tmp_path / "out")
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith(f"error: {one_channel / 'p09_0001.nii.gz'}: ")
    assert "p09_0000.nii.gz" in line and line.endswith(
        "(the model takes 2 channel(s): {case}_0000.nii.gz to {case}_0001.nii.gz)")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "--model", study, "--input", empty, "--output", tmp_path / "out")
    assert code == 2
    assert _one_error_line(err).startswith(f"error: {empty}: holds no NIfTI image ending in .nii.gz or .nii")
    code, _, err = run(capsys, "--model", study, "--input", tmp_path / "missing", "--output", tmp_path / "out")
    assert code == 2 and _one_error_line(err) == f"error: --input {tmp_path / 'missing'}: no such folder"


def test_the_output_folder_is_checked(study, inputs, tmp_path, capsys, no_networks):
    code, _, err = run(capsys, "--model", study, "--input", inputs, "--output", inputs)
    assert code == 2 and "is the input folder" in _one_error_line(err)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "--model", study, "--input", inputs, "--output", blocker)
    assert code == 2 and _one_error_line(err) == f"error: --output {blocker} is a file, not a folder"
    code, _, err = run(capsys, "--model", study, "--input", inputs, "--output", blocker / "below")
    assert code == 2 and "cannot create or write into it" in _one_error_line(err)


def test_bad_devices_and_arguments(study, inputs, tmp_path, capsys, no_networks):
    code, _, err = run(capsys, "--model", study, "--input", inputs, "--output", tmp_path / "o", "--device", "tpu")
    assert code == 2 and "--device 'tpu': expected cpu, cuda, cuda:N or auto" in _one_error_line(err)
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "--model", study, "--input", inputs, "--output", tmp_path / "o", "--device", "cuda")
        assert code == 2 and "CUDA is not available" in _one_error_line(err)
    with pytest.raises(SystemExit) as exited:
        predict_cli.main(["--model", str(study), "--input", str(inputs), "--output", "o", "--batch-size", "0"])
    assert exited.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
