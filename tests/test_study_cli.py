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


# --------------------------------------------------------------------------- unreadable and hostile datasets

SPLIT = ("--set", "data.num_validation=1", "--set", "data.num_test=1")


def _dataset(root: Path, ending: str = ".nii.gz", labels: dict | None = None) -> Path:
    """Five labelled single-channel cases with labels 0, 1, 2 on an oblique grid, one unlabelled."""
    import nibabel as nib
    import numpy as np

    from semiseg.data import write_case, write_dataset_json

    spacing = (0.8, 0.9, 2.5)
    cos, sin = np.cos(0.3), np.sin(0.3)
    affine = np.array([[0.8 * cos, -0.9 * sin, 0, -20.0], [0.8 * sin, 0.9 * cos, 0, 7.0], [0, 0, 2.5, 40.0],
                       [0, 0, 0, 1.0]])
    write_dataset_json(root, "Hostile", {"0": "MRI"}, labels or {"background": 0, "edema": 1, "tumour": 2},
                       num_training=6, file_ending=ending)
    rng = np.random.default_rng(3)
    for k in range(6):
        label = rng.integers(0, 3, size=(16, 16, 4)) if k < 5 else None
        files = write_case(root, f"case_{k}", rng.normal(100, 20, size=(1, 16, 16, 4)), label, spacing, affine=affine)
        for path in (*files.image_paths, files.label_path) if ending == ".nii" else ():
            if path is not None:
                img = nib.load(str(path))
                nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), str(path)[:-3])
                path.unlink()
    return root


def _refused_before_ray(result: subprocess.CompletedProcess) -> str:
    """The one stderr line of a study refused with status 2 before Ray was started."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "ray.init was called" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.stderr.strip().splitlines()[-1] == line
    return line


@pytest.mark.parametrize("ending", [".nii", ".nii.gz"])
def test_header_declaring_too_many_voxels_exits_2(tmp_path, ending):
    from tests.study_runs import run_study_without_ray, write_oversized_nifti

    root = _dataset(tmp_path / "Dataset020_Huge", ending)
    huge = write_oversized_nifti(root / "imagesTr" / f"case_2_0000{ending}")
    result = run_study_without_ray("ema_sweep.py", "--dataset", str(root), *SPLIT, tmp_path=tmp_path)
    assert _refused_before_ray(result) == (
        f"error: {huge}: header declares shape 30000x30000x3000 = 2,700,000,000,000 voxels, over the limit of "
        "1,073,741,824 voxels per file (set SEMISEG_MAX_VOXELS to raise it); not reading its data")
    assert len(result.stderr.strip().splitlines()) == 1, "progress ('validating ...') goes to stdout"


def test_label_symlink_loop_exits_2(tmp_path):
    from tests.study_runs import run_study_without_ray

    root = _dataset(tmp_path / "Dataset021_Loop")
    label = root / "labelsTr" / "case_1.nii.gz"
    label.unlink()
    label.symlink_to(label)
    result = run_study_without_ray("ema_sweep.py", "--dataset", str(root), *SPLIT, tmp_path=tmp_path)
    assert _refused_before_ray(result) == f"error: {label}: symlink loop: the symlink never resolves to a file"
    assert len(result.stderr.strip().splitlines()) == 1


def test_decathlon_entry_outside_the_dataset_exits_2(tmp_path):
    from tests.study_runs import run_study_without_ray

    nnunet = _dataset(tmp_path / "Dataset022_Source")
    root = tmp_path / "Task22_Outside"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for k in range(5):
        (nnunet / "imagesTr" / f"case_{k}_0000.nii.gz").rename(root / "imagesTr" / f"case_{k}.nii.gz")
        (nnunet / "labelsTr" / f"case_{k}.nii.gz").rename(root / "labelsTr" / f"case_{k}.nii.gz")
        training.append({"image": f"./imagesTr/case_{k}.nii.gz", "label": f"./labelsTr/case_{k}.nii.gz"})
    training[3]["image"] = "../Dataset022_Source/imagesTr/case_5_0000.nii.gz"
    (root / "dataset.json").write_text(json.dumps({
        "name": "Outside", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "edema", "2": "tumour"},
        "numTraining": 5, "training": training, "test": []}))
    result = run_study_without_ray("ema_sweep.py", "--dataset", str(root), *SPLIT, tmp_path=tmp_path)
    assert _refused_before_ray(result) == (
        f"error: {root / 'dataset.json'}: training[3] image '../Dataset022_Source/imagesTr/case_5_0000.nii.gz' "
        f"resolves to {nnunet / 'imagesTr' / 'case_5_0000.nii.gz'}, outside the dataset folder {root}; "
        "entries must stay inside it")
    assert len(result.stderr.strip().splitlines()) == 1


def test_declared_label_in_no_label_file_exits_2_unless_allowed(tmp_path):
    from tests.study_runs import RAY_STARTED_EXIT, run_study_without_ray

    root = _dataset(tmp_path / "Dataset023_Absent", labels={"background": 0, "edema": 1, "tumour": 2, "cyst": 3})
    problem = (f"{root / 'dataset.json'}: declared label(s) 'cyst' (3) occur in none of the 5 label files scanned "
               "(voxels counted after preprocessing); a network cannot learn them and scores Dice 0 on them")
    result = run_study_without_ray("ema_sweep.py", "--dataset", str(root), *SPLIT, tmp_path=tmp_path)
    assert _refused_before_ray(result) == (
        f"error: {problem}; fix the label files or dataset.json, or train anyway with --set "
        "data.allow_absent_labels=true")
    allowed = run_study_without_ray("ema_sweep.py", "--dataset", str(root), *SPLIT, "--set",
                                    "data.allow_absent_labels=true", tmp_path=tmp_path)
    assert allowed.returncode == RAY_STARTED_EXIT, allowed.stderr
    assert f"warning: {problem} (accepted: data.allow_absent_labels)" in allowed.stderr.splitlines()
    assert "error" not in allowed.stderr and "Traceback" not in allowed.stderr


@pytest.mark.parametrize(("uri", "expected"), [
    ("garbage://alice:s3cret@x", "no tracking store for the scheme 'garbage'"),
    ("postgresql://alice:s3cret@db.example.org/mlflow", "pip install 'psycopg[binary]'"),
])
def test_a_tracking_uri_mlflow_cannot_use_exits_2_before_ray_starts(tmp_path, uri, expected):
    import importlib.util

    if "postgresql" in uri and importlib.util.find_spec("psycopg"):
        pytest.skip("psycopg is installed here")
    result = _run_study("--tracking-uri", uri, tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: --tracking-uri ") and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "s3cret" not in result.stdout + result.stderr and "alice:***@" in result.stderr
    assert not (tmp_path / "runs").exists(), "nothing ran: no state, no Ray storage"



def test_a_baseline_grid_runs_each_method_at_each_variant_and_methods_replaces_its_methods():
    from semiseg.tune import Study
    from semiseg.tune.configs import study_baselines

    study = Study(name="grid", description="", baselines=({"method.name": "supervised", "train.seed": 9},),
                  baseline_methods=("supervised", "mean_teacher"),
                  baseline_variants=({"data.num_labelled": 2}, {"data.num_labelled": 4}),
                  smoke_baseline_variants=({"data.num_labelled": 1},))
    full = study_baselines(study, parse_args("x", "y", []))
    assert full == ({"method.name": "supervised", "train.seed": 9},
                    {"method.name": "supervised", "data.num_labelled": 2},
                    {"method.name": "mean_teacher", "data.num_labelled": 2},
                    {"method.name": "supervised", "data.num_labelled": 4},
                    {"method.name": "mean_teacher", "data.num_labelled": 4})
    smoke = study_baselines(study, parse_args("x", "y", ["--smoke"]))
    assert [b.get("data.num_labelled") for b in smoke] == [None, 1, 1]
    chosen = study.restricted_to(("pi_model", "temporal_ensembling"))
    assert [b["method.name"] for b in study_baselines(chosen, parse_args("x", "y", []))][1:] == \
        ["pi_model", "temporal_ensembling"] * 2


def test_label_efficiency_accepts_methods_it_does_not_list(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "studies" / "label_efficiency.py"), "--storage-path",
                             str(tmp_path / "runs"), "--methods", "supervised,pi_mdl"],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pi_mdl" in result.stderr and "Traceback" not in result.stderr
