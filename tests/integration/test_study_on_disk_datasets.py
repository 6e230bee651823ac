"""Studies on datasets read from a path: the nnU-Net v2 and Decathlon layouts, in 2D and 3D."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from semiseg.data.validation import load_case
from semiseg.data.phantom import generate_phantom
from semiseg.tune import run_study
from tests.integration.conftest import load_study, study_runs

pytestmark = pytest.mark.integration
SHAPE = (32, 32, 16)
SPACING = (1.0, 1.0, 2.5)


@pytest.fixture(scope="module")
def nnunet_dataset(tmp_path_factory) -> Path:
    """A phantom written in the nnU-Net v2 raw layout (it is the generator's own format)."""
    root = tmp_path_factory.mktemp("datasets") / "Dataset001_Phantom"
    generate_phantom(root, num_training=12, num_test=1, shape=SHAPE, spacing=SPACING, seed=3)
    return root


@pytest.fixture(scope="module")
def msd_dataset(nnunet_dataset, tmp_path_factory) -> Path:
    """The same cases re-written in the Medical Segmentation Decathlon layout, 3 without labels."""
    from semiseg.data.layout import read_layout

    layout = read_layout(nnunet_dataset)
    root = tmp_path_factory.mktemp("datasets") / "Task01_Phantom"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for index, files in enumerate(layout.training):
        case = load_case(files)
        affine = np.diag([*case.spacing, 1.0])
        nib.save(nib.Nifti1Image(case.image[0], affine), str(root / "imagesTr" / f"{case.case_id}.nii.gz"))
        entry = {"image": f"./imagesTr/{case.case_id}.nii.gz"}
        if index >= 3:
            nib.save(nib.Nifti1Image(case.label.astype(np.uint8), affine),
                     str(root / "labelsTr" / f"{case.case_id}.nii.gz"))
            entry["label"] = f"./labelsTr/{case.case_id}.nii.gz"
        training.append(entry)
    (root / "dataset.json").write_text(json.dumps({
        "name": "Phantom", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "structure"},
        "numTraining": len(training), "training": training, "test": []}))
    return root


ARGS_2D = ["--smoke", "--num-samples", "1", "--set", "model.width=4", "--set", "data.num_validation=2",
           "--set", "data.num_test=2", "--set", "train.max_epochs=2"]
ARGS_3D = [*ARGS_2D, "--set", "data.dims=3", "--set", "model.name=vnet", "--set", "model.depth=2",
           "--set", "data.patch_size=16x16x8", "--set", "train.batch_size=2", "--set", "train.labelled_per_batch=1",
           "--set", "train.val_batch_size=4"]


@pytest.mark.parametrize("layout_name,dims", [("nnunet", 2), ("msd", 3), ("msd", 2)])
def test_study_runs_on_a_dataset_path(layout_name, dims, request, ray_local, mlflow_store, tmp_path):
    dataset = request.getfixturevalue(f"{layout_name}_dataset")
    args = ARGS_2D if dims == 2 else ARGS_3D
    outcome = run_study(load_study("ema_sweep").STUDY, ["--dataset", str(dataset), "--storage-path", str(tmp_path),
                                                        "--tracking-uri", mlflow_store, *args])
    assert outcome.rows and all(r.status == "completed" and r.epochs == 2 for r in outcome.rows)
    assert all(r.config["data.dataset"] == str(dataset) and r.config["data.dims"] == dims for r in outcome.rows)
    assert all(0.0 <= r.metrics["test/dice"] <= 1.0 for r in outcome.rows if r.phase == "final")
    _, parents, _ = study_runs(mlflow_store, "ema_sweep")
    newest = max(parents, key=lambda p: p.info.start_time)
    assert newest.data.tags["semiseg.dataset"] in {"semiseg_phantom_seed3", "Phantom"}
