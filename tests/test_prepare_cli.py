"""Tests of the ``semiseg-prepare`` command."""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from semiseg.data import write_case, write_dataset_json
from semiseg.data.cli import main

SPACING = (1.0, 1.0, 3.0)
SHAPE = (12, 10, 4)


def _image(seed: int, channels: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, size=(channels, *SHAPE)).astype(np.float32)


def _label(seed: int) -> np.ndarray:
    return (np.random.default_rng(50 + seed).random(SHAPE) > 0.7).astype(np.int16)


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "Dataset004_Cli"
    write_dataset_json(root, "Cli", {"0": "T1", "1": "T2"}, {"background": 0, "lesion": 1}, num_training=4)
    for k in range(5):
        write_case(root, f"case_{k}", _image(k), _label(k) if k < 4 else None, SPACING)
    write_case(root, "case_90", _image(90), None, SPACING, split="Ts")
    return root


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_prepare_prints_a_summary(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, str(dataset), "--cache-root", str(tmp_path / "cache"), "--target-spacing",
                          "2x2x3", "--normalisation", "zscore_nonzero", "--progress-every", "2", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["roles"] == {"labelled": 4, "unlabelled": 1, "test images (no label)": 1}
    assert summary["original_spacing"]["median"] == [1.0, 1.0, 3.0]
    assert summary["spacing"]["max"] == [2.0, 2.0, 3.0] and summary["shape"]["min"] == [6.0, 5.0, 4.0]
    assert summary["rows"] == 5 * SHAPE[2]
    labels = {label["name"]: label for label in summary["labels"]}
    assert labels["background"]["voxels"] + labels["lesion"]["voxels"] == 4 * 6 * 5 * 4
    assert labels["lesion"]["cases"] == 4 and labels["lesion"]["value"] == 1
    images = np.stack([_image(k) for k in range(5)])
    assert summary["intensity"][0] == {"channel": "T1", "min": pytest.approx(float(images[:, 0].min())),
                                       "max": pytest.approx(float(images[:, 0].max()))}
    assert summary["cache"]["reused"] is False and Path(summary["cache"]["path"]).is_dir()
    assert err.splitlines() == ["prepared 2/5 cases (last: case_1)", "prepared 4/5 cases (last: case_3)",
                                "prepared 5/5 cases (last: case_4)"]


def test_second_run_reuses_and_prints_text(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = (str(dataset), "--cache-root", str(tmp_path / "cache"), "--num-labelled", "2", "--num-validation", "1",
            "--num-test", "1")
    assert _run(capsys, *args)[0] == 0
    code, out, _ = _run(capsys, *args)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("dataset    Cli (nnunet_v2) at ")
    assert "(reused)" in lines[1]
    assert "cases      labelled 2, unlabelled 1, validation 1, test 1" in lines
    assert "spacing out  min 1x1x3  median 1x1x3  max 1x1x3" in lines
    assert any(line.startswith("label      1 lesion: ") for line in lines)


def test_decathlon_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "Task09_Cli"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for k in range(3):
        affine = np.diag([*SPACING, 1.0])
        nib.save(nib.Nifti1Image(np.moveaxis(_image(k), 0, -1), affine), str(root / "imagesTr" / f"c{k}.nii.gz"))
        nib.save(nib.Nifti1Image(_label(k).astype(np.uint8), affine), str(root / "labelsTr" / f"c{k}.nii.gz"))
        training.append({"image": f"./imagesTr/c{k}.nii.gz", "label": f"./labelsTr/c{k}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "CliMSD", "modality": {"0": "FLAIR", "1": "T1w"}, "labels": {"0": "background", "1": "lesion"},
        "numTraining": 3, "training": training, "test": []}))
    code, out, _ = _run(capsys, str(root), "--cache-root", str(tmp_path / "cache"), "--dims", "3", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["dataset"]["layout"] == "msd" and summary["rows"] == 3
    assert [c["channel"] for c in summary["intensity"]] == ["FLAIR", "T1w"]


def test_bad_input_prints_one_line_per_problem(dataset: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    image = _image(1)
    image[0, 1, 1, 1] = np.nan
    write_case(dataset, "case_1", image, _label(1), SPACING)
    label = _label(2)
    label[0, 0, 0] = 4
    write_case(dataset, "case_2", _image(2), label, SPACING)
    code, out, err = _run(capsys, str(dataset), "--cache-root", str(tmp_path / "cache"), "--progress-every", "100")
    assert code == 2 and out == ""
    problems = [line for line in err.splitlines() if not line.startswith("prepared ")]
    assert problems == [
        f"{dataset / 'imagesTr' / 'case_1_0000.nii.gz'}: image holds 1 NaN/Inf voxel(s)",
        f"{dataset / 'labelsTr' / 'case_2.nii.gz'}: label values [4] are not declared in dataset.json labels "
        "(declared: [0, 1])",
    ]
    assert "Traceback" not in err
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_missing_dataset_and_over_budget_split(dataset: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, str(tmp_path / "nowhere"), "--cache-root", str(tmp_path / "cache"))
    assert code == 2 and err == f"{tmp_path / 'nowhere'}: dataset folder does not exist\n"
    code, _, err = _run(capsys, str(dataset), "--cache-root", str(tmp_path / "cache"), "--num-labelled", "3",
                        "--num-validation", "1", "--num-test", "1")
    assert code == 2 and err.startswith("split: asked for 5 labelled cases") and len(err.splitlines()) == 1
    assert not (tmp_path / "cache").exists(), "the split is checked before anything is built"


def test_bad_arguments_exit_with_status_two(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([str(dataset), "--target-spacing", "1x1"], [str(dataset), "--normalisation", "minmax"],
                 [str(dataset), "--ct-window", "500"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "Traceback" not in capsys.readouterr().err
    code, _, err = _run(capsys, str(dataset), "--normalisation", "ct", "--ct-window", "100,-100")
    assert code == 2 and err == "semiseg-prepare: ct_window must be (lo, hi) with lo < hi, got (100.0, -100.0)\n"


def test_console_script_points_at_main() -> None:
    [script] = [e for e in entry_points(group="console_scripts") if e.name == "semiseg-prepare"]
    assert script.load() is main


@pytest.mark.parametrize("ending", [".nii", ".nii.gz"])
def test_header_declaring_too_many_voxels(dataset: Path, tmp_path: Path, ending: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from tests.study_runs import write_oversized_nifti

    if ending == ".nii":  # the same dataset, stored uncompressed
        meta = json.loads((dataset / "dataset.json").read_text())
        (dataset / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".nii"}))
        for path in [*dataset.glob("*/*.nii.gz")]:
            img = nib.load(str(path))
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), str(path)[:-3])
            path.unlink()
    huge = write_oversized_nifti(dataset / "imagesTr" / f"case_2_0001{ending}")
    code, out, err = _run(capsys, str(dataset), "--cache-root", str(tmp_path / "cache"), "--progress-every", "100")
    problems = [line for line in err.splitlines() if not line.startswith("prepared ")]
    assert code == 2 and out == "" and "Traceback" not in err
    assert problems == [f"{huge}: header declares shape 30000x30000x3000 = 2,700,000,000,000 voxels, over the limit "
                        "of 1,073,741,824 voxels per file (set SEMISEG_MAX_VOXELS to raise it); not reading its data"]


def test_dangling_label_symlink_is_not_an_unlabelled_case(dataset: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    label = dataset / "labelsTr" / "case_3.nii.gz"
    label.rename(tmp_path / "elsewhere.nii.gz")
    label.symlink_to(tmp_path / "moved.nii.gz")
    code, out, err = _run(capsys, str(dataset), "--cache-root", str(tmp_path / "cache"))
    assert code == 2 and out == ""
    assert err == f"{label}: dangling symlink to {tmp_path / 'moved.nii.gz'} (which does not exist)\n"


def test_declared_label_in_no_label_file(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    meta = json.loads((dataset / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "lesion": 1, "cyst": 2, "scar": 3}
    (dataset / "dataset.json").write_text(json.dumps(meta))
    args = (str(dataset), "--cache-root", str(tmp_path / "cache"), "--progress-every", "100")
    code, out, err = _run(capsys, *args)
    problems = [line for line in err.splitlines() if not line.startswith("prepared ")]
    assert code == 2 and out == ""
    assert problems == [f"{dataset / 'dataset.json'}: declared label(s) 'cyst' (2), 'scar' (3) occur in none of the "
                        "4 label files scanned (voxels counted after preprocessing); a network cannot learn them and "
                        "scores Dice 0 on them; fix the label files or dataset.json, or accept them with "
                        "--allow-absent-labels"]
    code, out, err = _run(capsys, *args, "--allow-absent-labels", "--json")
    assert code == 0 and json.loads(out)["cache"]["reused"] is True
    assert [line for line in err.splitlines() if not line.startswith("prepared ")] == [
        f"warning: {dataset / 'dataset.json'}: declared label(s) 'cyst' (2), 'scar' (3) occur in none of the 4 label "
        "files scanned (voxels counted after preprocessing); a network cannot learn them and scores Dice 0 on them "
        "(accepted: --allow-absent-labels)"]
