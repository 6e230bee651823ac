"""From a study to segmentations: a smoke study on a 3-label, anisotropic, oblique LPS dataset, then
``semiseg-predict`` on its ``imagesTs`` and ``semiseg-evaluate`` against their reference labels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from semiseg.tune import run_study
from tests.integration.conftest import load_study
from tests.multiclass_nifti import LABELS, write_dataset

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
STUDY_ARGS = ["--smoke", "--num-samples", "1", "--final-splits", "2", "--set", "model.width=4",
              "--set", "data.num_validation=2", "--set", "data.num_test=2", "--set", "train.max_epochs=2",
              "--set", "data.dims=3", "--set", "model.depth=2", "--set", "data.patch_size=16x16x8",
              "--set", "data.target_spacing=1x1x3", "--set", "train.batch_size=2",
              "--set", "train.labelled_per_batch=1", "--set", "train.val_batch_size=4"]


@pytest.fixture(scope="module")
def finished_study(ray_local, tmp_path_factory):
    """The smoke study's outcome, folder and dataset (run once for the module)."""
    root = write_dataset(tmp_path_factory.mktemp("datasets") / "Dataset002_MultiClassLPS")
    storage = tmp_path_factory.mktemp("study")
    tracking = f"sqlite:///{storage / 'mlflow.db'}"
    outcome = run_study(load_study("ema_sweep").STUDY, ["--dataset", str(root), "--storage-path", str(storage),
                                                        "--tracking-uri", tracking, *STUDY_ARGS])
    return outcome, storage / "ema_sweep", root, tracking


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=600)


def test_the_study_keeps_every_final_model_with_its_split_and_per_class_metrics(finished_study):
    outcome, study_dir, _, _ = finished_study
    final = [r for r in outcome.rows if r.phase == "final"]
    assert sorted((r.method, r.config["data.split"]) for r in final) == [
        ("mean_teacher", 0), ("mean_teacher", 1), ("supervised", 0), ("supervised", 1)]
    for row in final:
        for name in ("organ", "lesion", "vessel"):
            assert 0.0 <= row.metrics[f"test/dice/{name}"] <= 1.0
        assert "test_postprocessed/dice" in row.metrics
    index = json.loads((study_dir / "models" / "index.json").read_text())
    assert sorted((m["method"], m["split"]) for m in index["models"]) == sorted(
        (r.method, r.config["data.split"]) for r in final)
    assert all((study_dir / m["path"]).is_file() for m in index["models"])
    splits = json.loads((study_dir / "splits_final.json").read_text())
    assert len(splits) == 2 and splits[0]["test"] == splits[1]["test"] and splits[0]["train"] != splits[1]["train"]


def test_predictions_have_their_inputs_geometry_and_are_scored_per_class(finished_study, tmp_path):
    _, study_dir, root, _ = finished_study
    output = tmp_path / "predictions"
    done = _run("semiseg-predict", "--model", str(study_dir), "--method", "mean_teacher", "--ensemble",
                "--input", str(root / "imagesTs"), "--output", str(output), "--tta", "mirror",
                "--save-probabilities", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    inputs = sorted((root / "imagesTs").glob("*_0000.nii.gz"))
    assert len(inputs) == 3
    for image_path in inputs:
        case_id = image_path.name[:-len("_0000.nii.gz")]
        source, written = nib.load(str(image_path)), nib.load(str(output / f"{case_id}.nii.gz"))
        assert written.shape == source.shape
        assert np.array_equal(written.affine, source.affine)
        assert int(written.header["sform_code"]) == int(source.header["sform_code"]) == 2
        assert int(written.header["qform_code"]) == int(source.header["qform_code"]) == 1
        labels = np.asarray(written.dataobj)
        assert np.issubdtype(labels.dtype, np.integer)
        assert set(np.unique(labels)) <= set(LABELS.values())
        probabilities = np.load(output / f"{case_id}.npz")["probabilities"]
        assert probabilities.shape == (4, *source.shape)
        assert np.allclose(probabilities.sum(axis=0), 1.0, atol=1e-3)

    scored = _run("semiseg-evaluate", "--pred", str(output), "--ref", str(root / "labelsTs"),
                  "--dataset-json", str(root / "dataset.json"), "--nsd-tolerance", "3")
    assert scored.returncode == 0, scored.stderr
    summary = json.loads((output / "summary.json").read_text())
    assert set(summary["mean_per_class"]) == {"organ", "lesion", "vessel"}
    assert len(summary["per_case"]) == 3
    for metrics in summary["mean_per_class"].values():
        assert {"dice", "jaccard", "precision", "recall", "hd95", "asd", "nsd"} <= set(metrics)
    organ = summary["mean_per_class"]["organ"]["dice"]
    assert organ is None or 0.0 <= organ <= 1.0


def test_a_reference_of_another_geometry_is_one_clear_line(finished_study, tmp_path):
    _, study_dir, root, _ = finished_study
    output = tmp_path / "predictions"
    assert _run("semiseg-predict", "--model", str(study_dir), "--input", str(root / "imagesTs"),
                "--output", str(output), "--device", "cpu").returncode == 0
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    for path in sorted((root / "labelsTs").glob("*.nii.gz")):
        image = nib.load(str(path))
        affine = image.affine.copy()
        affine[:3, 3] += 5.0
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), str(shifted / path.name))
    scored = _run("semiseg-evaluate", "--pred", str(output), "--ref", str(shifted))
    assert scored.returncode == 2
    lines = [line for line in scored.stderr.splitlines() if "affine" in line]
    assert len(lines) == 3 and all("multi_test_" in line for line in lines)
    assert "Traceback" not in scored.stderr
