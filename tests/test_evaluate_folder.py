"""Tests for semiseg-evaluate (semiseg.inference.evaluate_folder / evaluate_cli) on real NIfTI files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from semiseg.data.errors import DatasetError
from semiseg.inference.evaluate_cli import main
from semiseg.inference.evaluate_folder import (
    evaluate_folder,
    labels_from_dataset_json,
    parse_label_ids,
    write_summary,
)

SHAPE = (8, 7, 6)
SPACING = (1.0, 2.0, 3.0)
LABELS = {"background": 0, "liver": 1, "spleen": 2, "tumour": 3}


def oblique_lps_affine(spacing=SPACING) -> np.ndarray:
    """Voxel-to-world: scaled columns, rotated 30 degrees about z, x and y flipped (LPS-like)."""
    angle = math.radians(30)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0.0],
                         [math.sin(angle), math.cos(angle), 0.0],
                         [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rotation @ np.diag(spacing)
    affine[:3, 3] = (12.5, -40.0, 7.25)
    return affine


AFFINE = oblique_lps_affine()


def reference_c1() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1:4, 1:4, 1:3] = 1
    labels[5:7, 2:5, 1:4] = 2
    labels[2:4, 4:6, 3:5] = 3
    return labels


def save(labels: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    image = nib.Nifti1Image(labels, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two cases; c1: tumour shifted one voxel along z (3 mm); c2: spleen missed, tumour absent from both."""
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    ref1 = reference_c1()
    pred1 = ref1.copy()
    pred1[pred1 == 3] = 0
    pred1[2:4, 4:6, 4:6] = 3
    save(ref1, ref_dir / "c1.nii.gz")
    save(pred1, pred_dir / "c1.nii.gz")
    ref2 = np.zeros(SHAPE, dtype=np.uint8)
    ref2[0:3, 0:2, 0:2] = 1
    ref2[6, 6, 5] = 2
    pred2 = ref2.copy()
    pred2[6, 6, 5] = 0
    save(ref2, ref_dir / "c2.nii.gz")
    save(pred2, pred_dir / "c2.nii.gz")
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": LABELS, "file_ending": ".nii.gz"}))
    return pred_dir, ref_dir, dataset_json


def test_per_class_metrics_in_millimetres(folders):
    pred_dir, ref_dir, dataset_json = folders
    summary = evaluate_folder(pred_dir, ref_dir, dataset_json=dataset_json)
    assert summary["labels"] == {"1": "liver", "2": "spleen", "3": "tumour"}
    assert summary["n_cases"] == 2
    c1, c2 = summary["per_case"]
    assert (c1["case_id"], c2["case_id"]) == ("c1", "c2")
    assert c1["prediction"] == str(pred_dir / "c1.nii.gz")
    assert c1["reference"] == str(ref_dir / "c1.nii.gz")
    # tumour: two 2x2 slabs one voxel apart along z (3 mm): half of each surface at 0, half at 3 mm
    tumour = c1["metrics"]["tumour"]
    assert tumour["dice"] == pytest.approx(0.5)
    assert tumour["hd95"] == pytest.approx(3.0)
    assert tumour["asd"] == pytest.approx(1.5)
    assert tumour["nsd"] == pytest.approx(0.5)
    assert c1["metrics"]["liver"]["dice"] == 1.0 and c1["metrics"]["liver"]["hd95"] == 0.0
    assert c1["mean"]["dice"] == pytest.approx(2.5 / 3)
    assert c1["mean"]["hd95"] == pytest.approx(1.0)
    # c2: spleen missed (dice 0, hd95 NaN), tumour absent from both (all NaN)
    assert c2["metrics"]["spleen"]["dice"] == 0.0
    assert math.isnan(c2["metrics"]["spleen"]["hd95"])
    assert all(math.isnan(v) for v in c2["metrics"]["tumour"].values())
    assert c2["mean"]["dice"] == pytest.approx(0.5)
    assert math.isnan(c2["mean"]["hd95"])

    per_class = summary["mean_per_class"]
    assert per_class["liver"]["dice"] == 1.0
    assert per_class["liver"]["dice_std"] == 0.0
    assert per_class["spleen"]["dice"] == pytest.approx(0.5)
    assert per_class["spleen"]["dice_std"] == pytest.approx(math.sqrt(0.5))  # ddof 1 of (1, 0)
    assert per_class["spleen"]["hd95"] == 0.0
    assert per_class["spleen"]["hd95_nan_cases"] == 1
    assert per_class["tumour"]["dice"] == pytest.approx(0.5)
    assert per_class["tumour"]["dice_nan_cases"] == 1
    assert math.isnan(per_class["tumour"]["dice_std"])  # one value
    assert per_class["tumour"]["hd95"] == pytest.approx(3.0)
    over = summary["mean_over_classes"]
    assert over["dice"] == pytest.approx((2.5 / 3 + 0.5) / 2)
    assert over["hd95"] == pytest.approx(1.0)
    assert over["hd95_nan_cases"] == 1
    assert set(c1["metrics"]["liver"]) == {"dice", "jaccard", "precision", "recall", "specificity",
                                           "accuracy", "hd95", "asd", "nsd"}


def test_summary_json_is_valid_with_nulls(folders, tmp_path):
    pred_dir, ref_dir, dataset_json = folders
    summary = evaluate_folder(pred_dir, ref_dir, dataset_json=dataset_json, nsd_tolerance_mm=3.0)
    path = tmp_path / "out" / "s.json"
    path.parent.mkdir()
    write_summary(summary, path)
    text = path.read_text()
    assert "NaN" not in text
    loaded = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert loaded["nsd_tolerance_mm"] == 3.0
    assert loaded["per_case"][1]["metrics"]["tumour"]["dice"] is None
    assert loaded["per_case"][0]["metrics"]["tumour"]["nsd"] == 1.0  # 3 mm within a 3 mm tolerance
    assert loaded["mean_per_class"]["tumour"]["dice_std"] is None
    assert "nsd" in loaded["metric_definitions"]


def test_labels_from_the_references_without_dataset_json(folders):
    pred_dir, ref_dir, _ = folders
    summary = evaluate_folder(pred_dir, ref_dir)
    assert summary["labels"] == {"1": "1", "2": "2", "3": "3"}
    assert summary["mean_per_class"]["3"]["hd95"] == pytest.approx(3.0)


def test_label_subset_with_dataset_json(folders):
    pred_dir, ref_dir, dataset_json = folders
    summary = evaluate_folder(pred_dir, ref_dir, dataset_json=dataset_json, label_ids=[3])
    assert summary["labels"] == {"3": "tumour"}
    assert summary["mean_over_classes"]["hd95"] == pytest.approx(3.0)
    assert summary["mean_over_classes"]["dice_nan_cases"] == 1


def test_parallel_matches_serial(folders):
    pred_dir, ref_dir, dataset_json = folders
    serial = evaluate_folder(pred_dir, ref_dir, dataset_json=dataset_json, num_processes=1)
    parallel = evaluate_folder(pred_dir, ref_dir, dataset_json=dataset_json, num_processes=2)
    assert json.dumps(serial, sort_keys=True) == json.dumps(parallel, sort_keys=True)


def test_uncompressed_nii_and_2d_files(tmp_path):
    ref = np.zeros((6, 5), dtype=np.int16)
    ref[1:3, 1:3] = 1
    pred = np.zeros((6, 5), dtype=np.int16)
    pred[1:3, 2:4] = 1  # one column over, spacing 2 mm along axis 1
    affine = np.diag([0.5, 2.0, 4.0, 1.0])
    save(ref, tmp_path / "ref" / "a.nii", affine)
    save(pred, tmp_path / "pred" / "a.nii", affine)
    summary = evaluate_folder(tmp_path / "pred", tmp_path / "ref", label_ids=[1])
    liver = summary["per_case"][0]["metrics"]["1"]
    assert liver["dice"] == pytest.approx(0.5)
    assert liver["hd95"] == pytest.approx(2.0)


def test_shape_mismatch_names_both_files(folders, capsys):
    pred_dir, ref_dir, dataset_json = folders
    save(np.zeros((8, 7, 5), dtype=np.uint8), pred_dir / "c2.nii.gz")
    with pytest.raises(DatasetError) as info:
        evaluate_folder(pred_dir, ref_dir, dataset_json=dataset_json)
    lines = str(info.value).splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{pred_dir / 'c2.nii.gz'}: shape (8, 7, 5) differs from the shape (8, 7, 6)")
    assert str(ref_dir / "c2.nii.gz") in lines[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["--pred", str(pred_dir), "--ref", str(ref_dir), "--dataset-json", str(dataset_json)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "shape (8, 7, 5) differs" in err and str(ref_dir / "c2.nii.gz") in err
    assert not (pred_dir / "summary.json").exists()


def test_affine_mismatch_names_both_files_and_affines(folders, capsys):
    pred_dir, ref_dir, dataset_json = folders
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.01
    save(reference_c1(), pred_dir / "c1.nii.gz", shifted)
    with pytest.raises(DatasetError) as info:
        evaluate_folder(pred_dir, ref_dir, dataset_json=dataset_json)
    (line,) = str(info.value).splitlines()
    assert line.startswith(f"{pred_dir / 'c1.nii.gz'}: affine ")
    assert f"of its reference {ref_dir / 'c1.nii.gz'}" in line
    assert "12.51]" in line and "12.5]" in line
    with pytest.raises(SystemExit) as exit_info:
        main(["--pred", str(pred_dir), "--ref", str(ref_dir), "--num-processes", "1"])
    assert exit_info.value.code == 2
    assert "affine" in capsys.readouterr().err


def test_affine_within_tolerance_is_accepted(folders):
    pred_dir, ref_dir, dataset_json = folders
    nudged = AFFINE.copy()
    nudged[1, 3] += 5e-4
    save(reference_c1(), pred_dir / "c1.nii.gz", nudged)
    summary = evaluate_folder(pred_dir, ref_dir, dataset_json=dataset_json)
    assert summary["per_case"][0]["metrics"]["tumour"]["dice"] == 1.0


def test_missing_cases_are_listed_one_line_each(folders, capsys):
    pred_dir, ref_dir, dataset_json = folders
    (pred_dir / "c2.nii.gz").unlink()
    save(reference_c1(), pred_dir / "extra.nii.gz")
    with pytest.raises(DatasetError) as info:
        evaluate_folder(pred_dir, ref_dir, dataset_json=dataset_json)
    assert str(info.value).splitlines() == [
        f"{ref_dir / 'c2.nii.gz'}: case 'c2' has a reference but no prediction in {pred_dir}",
        f"{pred_dir / 'extra.nii.gz'}: case 'extra' has a prediction but no reference in {ref_dir}",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(["--pred", str(pred_dir), "--ref", str(ref_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "case 'c2' has a reference but no prediction" in err
    assert "case 'extra' has a prediction but no reference" in err


def test_undeclared_label_value_in_prediction(folders):
    pred_dir, ref_dir, dataset_json = folders
    pred = reference_c1()
    pred[0, 0, 0] = 5
    save(pred, pred_dir / "c1.nii.gz")
    with pytest.raises(DatasetError) as info:
        evaluate_folder(pred_dir, ref_dir, dataset_json=dataset_json)
    (line,) = str(info.value).splitlines()
    assert line == (f"{pred_dir / 'c1.nii.gz'}: label values [5] are not among the class ids [1, 2, 3] "
                    f"(and background 0) of dataset.json {dataset_json}")


def test_labels_option_rejects_values_outside_it(folders):
    pred_dir, ref_dir, _ = folders
    with pytest.raises(DatasetError) as info:
        evaluate_folder(pred_dir, ref_dir, label_ids=[1, 3])
    lines = str(info.value).splitlines()
    assert lines[0] == (f"{pred_dir / 'c1.nii.gz'}: label values [2] are not among the class ids [1, 3] "
                        "(and background 0) of --labels (to score a subset of the labels, declare them all "
                        "with --dataset-json)")
    assert len(lines) == 3  # c1's prediction and reference, c2's reference (its prediction has no 2)


def test_non_integer_label_map_is_rejected(folders):
    pred_dir, ref_dir, dataset_json = folders
    pred = reference_c1().astype(np.float32)
    pred[0, 0, 0] = 0.5
    save(pred, pred_dir / "c1.nii.gz")
    with pytest.raises(DatasetError, match=r"c1.nii.gz: holds values that are not integer class ids, e.g. 0.5"):
        evaluate_folder(pred_dir, ref_dir, dataset_json=dataset_json)


def test_cli_writes_summary_and_prints_table(folders, capsys, tmp_path):
    pred_dir, ref_dir, dataset_json = folders
    output = tmp_path / "summary_out.json"
    main(["--pred", str(pred_dir), "--ref", str(ref_dir), "--dataset-json", str(dataset_json),
          "--nsd-tolerance", "3", "--output", str(output), "--num-processes", "1"])
    out = capsys.readouterr().out
    summary = json.loads(output.read_text())
    assert summary["mean_per_class"]["tumour"]["nsd"] == 1.0
    assert not (pred_dir / "summary.json").exists()
    lines = out.splitlines()
    assert lines[0].split() == ["class", "Dice", "HD95", "(mm)", "NSD@3mm"]
    tumour = next(line for line in lines if line.startswith("tumour"))
    # the tumour is absent from both maps of c2: every metric of that case left out and counted
    assert tumour.split() == ["tumour", "0.5000", "(1", "NaN)", "3.0000", "(1", "NaN)", "1.0000", "(1", "NaN)"]
    spleen = next(line for line in lines if line.startswith("spleen"))
    assert spleen.split() == ["spleen", "0.5000", "0.0000", "(1", "NaN)", "0.5000"]
    assert lines[-1] == f"summary: {output}"


def test_cli_default_output_in_pred_folder(folders, capsys):
    pred_dir, ref_dir, dataset_json = folders
    main(["--pred", str(pred_dir), "--ref", str(ref_dir), "--labels", "1,2,3", "--dataset-json", str(dataset_json)])
    summary = json.loads((pred_dir / "summary.json").read_text())
    assert summary["labels"] == {"1": "liver", "2": "spleen", "3": "tumour"}
    assert f"summary: {pred_dir / 'summary.json'}" in capsys.readouterr().out
    # a second run ignores the summary file in the prediction folder
    main(["--pred", str(pred_dir), "--ref", str(ref_dir)])


@pytest.mark.parametrize("argv_tail, message", [
    (["--labels", "1,x"], "--labels must be comma-separated"),
    (["--num-processes", "0"], "--num-processes must be at least 1"),
    (["--nsd-tolerance", "-1"], "--nsd-tolerance must be a finite number"),
])
def test_cli_bad_arguments_exit_2(folders, capsys, argv_tail, message):
    pred_dir, ref_dir, _ = folders
    with pytest.raises(SystemExit) as info:
        main(["--pred", str(pred_dir), "--ref", str(ref_dir), *argv_tail])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_dataset_json_problems(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": {"background": 0, "tumour": [1, 2], "edema": 3}}))
    with pytest.raises(DatasetError, match=r"label 'tumour' has value \[1, 2\]; only integer labels"):
        labels_from_dataset_json(path)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        labels_from_dataset_json(path)
    path.write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 1}}))
    with pytest.raises(DatasetError, match="labels 'a' and 'b' share the value 1"):
        labels_from_dataset_json(path)


def test_dataset_json_must_declare_selected_labels(folders):
    pred_dir, ref_dir, dataset_json = folders
    with pytest.raises(DatasetError, match=r"does not declare the class ids \[4\] given by --labels"):
        evaluate_folder(pred_dir, ref_dir, dataset_json=dataset_json, label_ids=[1, 4])


def test_parse_label_ids():
    assert parse_label_ids("1, 2,3") == [1, 2, 3]
    with pytest.raises(ValueError, match="repeats"):
        parse_label_ids("1,1")


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="the prediction folder does not exist"):
        evaluate_folder(tmp_path / "nope", tmp_path)
