"""Tests of the nnU-Net v2 raw layout reader, loader, validator and writer."""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from semiseg.data import (
    DatasetError,
    load_case,
    read_layout,
    validate_layout,
    write_case,
    write_dataset_json,
)

SPACING = (0.7, 0.8, 2.5)
SHAPE = (10, 9, 4)
LABELS = {"background": 0, "structure": 1}


def _oblique_affine() -> np.ndarray:
    angle = np.deg2rad(30.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0],
                         [np.sin(angle), np.cos(angle), 0.0],
                         [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(SPACING)
    affine[:3, 3] = (-12.0, 4.5, 30.0)
    return affine


def _image(seed: int, channels: int = 2, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, size=(channels, *shape)).astype(np.float32)


def _label(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) > 0.7).astype(np.int16)


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(data, np.diag([*SPACING, 1.0]) if affine is None else affine), str(path))


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """Two-channel dataset: 2 labelled cases (one oblique), 1 unlabelled, 1 test case."""
    root = tmp_path / "Dataset001_Toy"
    write_dataset_json(root, "Toy", {"0": "T1", "1": "T2"}, LABELS, num_training=2)
    write_case(root, "case_000", _image(0), _label(0), SPACING)
    write_case(root, "case_001", _image(1), _label(1), SPACING, affine=_oblique_affine())
    write_case(root, "case_002", _image(2), None, SPACING)
    write_case(root, "case_900", _image(9), None, SPACING, split="Ts")
    return root


def _messages(err: pytest.ExceptionInfo[DatasetError]) -> str:
    return str(err.value)


# --------------------------------------------------------------------------- round trip


def test_round_trip_of_written_cases(dataset: Path) -> None:
    layout = read_layout(dataset)
    assert layout.name == "Toy"
    assert layout.labelled_ids == ("case_000", "case_001")
    assert layout.unlabelled_ids == ("case_002",)
    assert [c.case_id for c in layout.test] == ["case_900"]
    assert layout.num_channels == 2
    assert layout.class_ids == (0, 1) and layout.num_classes == 2
    assert layout.file_ending == ".nii.gz"
    assert layout.get_case("case_001").image_paths[1].name == "case_001_0001.nii.gz"
    for seed, case_id in enumerate(("case_000", "case_001")):
        case = load_case(layout.get_case(case_id), layout.class_ids)
        np.testing.assert_array_equal(case.image, _image(seed))
        np.testing.assert_array_equal(case.label, _label(seed))
        assert case.image.dtype == np.float32 and case.label.dtype == np.int16
        assert case.spacing == pytest.approx(SPACING, abs=1e-5)
    oblique = load_case(layout.get_case("case_001"))
    np.testing.assert_allclose(oblique.affine, _oblique_affine(), atol=1e-4)
    assert load_case(layout.get_case("case_002")).label is None
    validate_layout(layout)


def test_two_dimensional_case_round_trip(tmp_path: Path) -> None:
    write_dataset_json(tmp_path, "Flat", {"0": "MRI"}, LABELS, num_training=1)
    write_case(tmp_path, "slice_0", _image(3, 1, (12, 8, 1)), _label(3, (12, 8, 1)), (0.5, 0.6, 1.0))
    case = load_case(read_layout(tmp_path).training[0])
    assert case.image.shape == (1, 12, 8, 1) and case.label.shape == (12, 8, 1)
    assert case.spacing == pytest.approx((0.5, 0.6, 1.0))


def test_plain_2d_nifti_is_read_as_single_slice(dataset: Path) -> None:
    flat = dataset / "imagesTr" / "flat_0000.nii.gz"
    for channel in range(2):
        _save(flat.with_name(f"flat_000{channel}.nii.gz"), np.ones((6, 5), np.float32) * channel)
    case = load_case(read_layout(dataset).get_case("flat"))
    assert case.image.shape == (2, 6, 5, 1)
    assert case.spacing[:2] == pytest.approx(SPACING[:2])


def test_write_case_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without labels"):
        write_case(tmp_path, "x", _image(0), _label(0), SPACING, split="Ts")
    with pytest.raises(ValueError, match="does not match image shape"):
        write_case(tmp_path, "x", _image(0), _label(0, (3, 3, 3)), SPACING)
    with pytest.raises(ValueError, match="spacing"):
        write_case(tmp_path, "x", _image(0), None, SPACING, affine=np.eye(4))
    assert not list(tmp_path.rglob("*.nii.gz"))


def test_write_leaves_no_temporary_files(dataset: Path) -> None:
    assert not [p for p in dataset.rglob("*") if p.name.startswith(".")]


def test_dataset_error_formats_one_line_per_problem() -> None:
    err = DatasetError([("a/x.nii.gz", "broken"), ("split", "too many")])
    assert str(err) == "a/x.nii.gz: broken\nsplit: too many"
    assert DatasetError.single(Path("b.nii.gz"), "bad").problems == [("b.nii.gz", "bad")]
    copy = pickle.loads(pickle.dumps(err))
    assert isinstance(copy, DatasetError) and copy.problems == err.problems and str(copy) == str(err)


# --------------------------------------------------------------------------- malformed files


def test_truncated_file(dataset: Path) -> None:
    path = dataset / "imagesTr" / "case_000_0001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as err:
        load_case(read_layout(dataset).get_case("case_000"))
    assert "case_000_0001.nii.gz" in _messages(err) and "truncated" in _messages(err)


def test_text_file_named_like_nifti(dataset: Path) -> None:
    path = dataset / "labelsTr" / "case_000.nii.gz"
    path.write_text("this is not an image\n")
    with pytest.raises(DatasetError) as err:
        load_case(read_layout(dataset).get_case("case_000"))
    assert str(path) in _messages(err) and "not a readable NIfTI" in _messages(err)


def test_label_shape_mismatch(dataset: Path) -> None:
    _save(dataset / "labelsTr" / "case_000.nii.gz", np.zeros((10, 9, 3), np.int16))
    with pytest.raises(DatasetError) as err:
        load_case(read_layout(dataset).get_case("case_000"))
    assert "case_000.nii.gz: label shape (10, 9, 3) does not match image shape (10, 9, 4)" in _messages(err)


def test_label_affine_mismatch(dataset: Path) -> None:
    shifted = np.diag([*SPACING, 1.0])
    shifted[0, 3] = 5.0
    _save(dataset / "labelsTr" / "case_000.nii.gz", _label(0), shifted)
    with pytest.raises(DatasetError) as err:
        load_case(read_layout(dataset).get_case("case_000"))
    assert "case_000.nii.gz" in _messages(err) and "label affine does not match image affine" in _messages(err)


def test_undeclared_label_value(dataset: Path) -> None:
    label = _label(0)
    label[0, 0, 0] = 7
    _save(dataset / "labelsTr" / "case_000.nii.gz", label)
    layout = read_layout(dataset)
    with pytest.raises(DatasetError) as err:
        load_case(layout.get_case("case_000"), layout.class_ids)
    assert "case_000.nii.gz: label values [7] are not declared" in _messages(err)


def test_nan_voxel(dataset: Path) -> None:
    image = _image(0)[0]
    image[3, 2, 1] = np.nan
    _save(dataset / "imagesTr" / "case_000_0000.nii.gz", image)
    with pytest.raises(DatasetError) as err:
        load_case(read_layout(dataset).get_case("case_000"))
    assert "case_000_0000.nii.gz: image holds 1 NaN/Inf voxel(s)" in _messages(err)


def test_channel_shape_mismatch(dataset: Path) -> None:
    _save(dataset / "imagesTr" / "case_000_0001.nii.gz", np.ones((10, 9, 5), np.float32))
    with pytest.raises(DatasetError) as err:
        load_case(read_layout(dataset).get_case("case_000"))
    assert "case_000_0001.nii.gz: channel shape (10, 9, 5) differs" in _messages(err)


def test_wrong_number_of_dimensions(dataset: Path) -> None:
    _save(dataset / "imagesTr" / "case_000_0000.nii.gz", np.ones((10, 9, 4, 2), np.float32))
    with pytest.raises(DatasetError) as err:
        load_case(read_layout(dataset).get_case("case_000"))
    assert "case_000_0000.nii.gz: expected 2 or 3 spatial dimensions" in _messages(err)


def test_constant_image_flagged_by_validation(dataset: Path) -> None:
    _save(dataset / "imagesTr" / "case_002_0001.nii.gz", np.full(SHAPE, 3.0, np.float32))
    layout = read_layout(dataset)
    load_case(layout.get_case("case_002"))
    with pytest.raises(DatasetError) as err:
        validate_layout(layout)
    assert "case_002_0001.nii.gz" in _messages(err)
    assert "constant image" in _messages(err) and "divide by zero" in _messages(err)


def test_validation_reports_problems_of_all_cases(dataset: Path) -> None:
    image = _image(0)[1]
    image[0, 0, 0] = np.inf
    _save(dataset / "imagesTr" / "case_000_0001.nii.gz", image)
    label = _label(1)
    label[1, 1, 1] = 7
    _save(dataset / "labelsTr" / "case_001.nii.gz", label, _oblique_affine())
    (dataset / "imagesTs" / "case_900_0000.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DatasetError) as err:
        validate_layout(read_layout(dataset))
    paths = [Path(p).name for p, _ in err.value.problems]
    assert paths == ["case_000_0001.nii.gz", "case_001.nii.gz", "case_900_0000.nii.gz"]
    assert "[7]" in _messages(err) and "NaN/Inf" in _messages(err)


# --------------------------------------------------------------------------- malformed layout


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        read_layout(tmp_path / "nowhere")
    assert _messages(err) == f"{tmp_path / 'nowhere'}: dataset folder does not exist"


def test_missing_dataset_json(dataset: Path) -> None:
    (dataset / "dataset.json").unlink()
    with pytest.raises(DatasetError) as err:
        read_layout(dataset)
    assert f"{dataset / 'dataset.json'}: dataset.json is missing" in _messages(err)
    assert len(err.value.problems) == 1, "channel files must not be reported when channel_names is unknown"


def test_unparseable_dataset_json(dataset: Path) -> None:
    (dataset / "dataset.json").write_text("{'labels': oops")
    with pytest.raises(DatasetError) as err:
        read_layout(dataset)
    assert "dataset.json: cannot parse dataset.json as JSON" in _messages(err)


def test_missing_keys_in_dataset_json(dataset: Path) -> None:
    meta = json.loads((dataset / "dataset.json").read_text())
    del meta["labels"], meta["file_ending"]
    (dataset / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError) as err:
        read_layout(dataset)
    assert "dataset.json: dataset.json is missing the required key 'labels'" in _messages(err)
    assert "missing the required key 'file_ending'" in _messages(err)
    assert "numTraining" not in _messages(err)


def test_region_based_labels_rejected(dataset: Path) -> None:
    meta = json.loads((dataset / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "whole": [1, 2]}
    (dataset / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="label 'whole' has value \\[1, 2\\]"):
        read_layout(dataset)


def test_missing_channel_file(dataset: Path) -> None:
    (dataset / "imagesTr" / "case_001_0001.nii.gz").unlink()
    with pytest.raises(DatasetError) as err:
        read_layout(dataset)
    assert "case_001_0001.nii.gz: channel 1 file of case 'case_001' is missing" in _messages(err)


def test_label_without_image(dataset: Path) -> None:
    _save(dataset / "labelsTr" / "ghost.nii.gz", _label(0))
    with pytest.raises(DatasetError) as err:
        read_layout(dataset)
    assert "ghost.nii.gz: label file has no image" in _messages(err)


def test_missing_images_folder(dataset: Path) -> None:
    for path in (dataset / "imagesTr").iterdir():
        path.unlink()
    (dataset / "imagesTr").rmdir()
    with pytest.raises(DatasetError) as err:
        read_layout(dataset)
    assert "imagesTr: imagesTr folder is missing" in _messages(err)


def test_empty_images_folder(dataset: Path) -> None:
    for folder in ("imagesTr", "labelsTr"):
        for path in (dataset / folder).iterdir():
            path.unlink()
    with pytest.raises(DatasetError) as err:
        read_layout(dataset)
    assert "imagesTr: no training cases found" in _messages(err)


def test_read_layout_collects_all_problems(dataset: Path) -> None:
    meta = json.loads((dataset / "dataset.json").read_text())
    del meta["numTraining"]
    (dataset / "dataset.json").write_text(json.dumps(meta))
    (dataset / "imagesTr" / "case_000_0000.nii.gz").unlink()
    _save(dataset / "imagesTr" / "case_002_0002.nii.gz", np.ones(SHAPE, np.float32))
    with pytest.raises(DatasetError) as err:
        read_layout(dataset)
    text = _messages(err)
    assert len(err.value.problems) == 3
    assert "'numTraining'" in text
    assert "case_000_0000.nii.gz: channel 0 file" in text
    assert "case_002_0002.nii.gz: channel 2 is not declared" in text


# --------------------------------------------------------------------------- unreadable and hostile files

MULTI_LABELS = {"background": 0, "edema": 1, "tumour": 2}


def _multiclass(seed: int) -> np.ndarray:
    return np.random.default_rng(200 + seed).integers(0, 3, size=SHAPE).astype(np.int16)


def _multiclass_dataset(root: Path, ending: str = ".nii.gz") -> Path:
    """Three labelled oblique two-channel cases with labels 0, 1, 2, in files ending ``ending``."""
    write_dataset_json(root, "Multi", {"0": "T1", "1": "T2"}, MULTI_LABELS, num_training=3, file_ending=ending)
    for k in range(3):
        files = write_case(root, f"case_{k:03d}", _image(k), _multiclass(k), SPACING, affine=_oblique_affine())
        if ending == ".nii":
            for path in (*files.image_paths, files.label_path):
                img = nib.load(str(path))
                nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), str(path)[:-3])
                path.unlink()
    return root


@pytest.mark.parametrize("ending", [".nii", ".nii.gz"])
def test_header_declaring_too_many_voxels_is_refused_before_reading(tmp_path: Path, ending: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.study_runs import write_oversized_nifti
    from semiseg.data.nifti import MAX_VOXELS

    root = _multiclass_dataset(tmp_path / "Dataset010_Huge", ending)
    huge = write_oversized_nifti(root / "imagesTr" / f"case_001_0001{ending}")
    read = nib.dataobj_images.DataobjImage.get_fdata

    def guarded(self, *args, **kwargs):
        assert int(np.prod(self.shape)) <= MAX_VOXELS, "the data of an oversized file was read"
        return read(self, *args, **kwargs)

    monkeypatch.setattr(nib.dataobj_images.DataobjImage, "get_fdata", guarded)
    layout = read_layout(root)
    with pytest.raises(DatasetError) as err:
        validate_layout(layout)
    assert err.value.problems == [(str(huge), "header declares shape 30000x30000x3000 = 2,700,000,000,000 voxels, "
                                   "over the limit of 1,073,741,824 voxels per file (set SEMISEG_MAX_VOXELS to "
                                   "raise it); not reading its data")]
    monkeypatch.setenv("SEMISEG_MAX_VOXELS", str(10 * 9 * 4 - 1))
    with pytest.raises(DatasetError, match="case_000_0000.* over the limit of 359 voxels"):
        load_case(layout.get_case("case_000"))
    monkeypatch.setenv("SEMISEG_MAX_VOXELS", "lots")
    with pytest.raises(DatasetError, match="^SEMISEG_MAX_VOXELS: must be a positive number of voxels, got 'lots'$"):
        load_case(layout.get_case("case_000"))


def test_unreadable_label_files_are_errors_with_their_reason(tmp_path: Path) -> None:
    root = _multiclass_dataset(tmp_path / "Dataset011_Links")
    labels = root / "labelsTr"
    loop = labels / "case_000.nii.gz"
    loop.unlink()
    loop.symlink_to(tmp_path / "loop_b.nii.gz")
    (tmp_path / "loop_b.nii.gz").symlink_to(loop)
    dangling = labels / "case_001.nii.gz"
    dangling.unlink()
    dangling.symlink_to(tmp_path / "moved" / "case_001.nii.gz")
    folder = labels / "case_002.nii.gz"
    folder.unlink()
    folder.mkdir()
    with pytest.raises(DatasetError) as err:
        read_layout(root)
    assert err.value.problems == [
        (str(loop), "symlink loop: the symlink never resolves to a file"),
        (str(dangling), f"dangling symlink to {tmp_path / 'moved' / 'case_001.nii.gz'} (which does not exist)"),
        (str(folder), "is a directory, not a NIfTI file"),
    ]


def test_label_file_without_read_permission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from semiseg.data import nifti as nifti_module

    root = _multiclass_dataset(tmp_path / "Dataset012_Perm")
    locked = root / "labelsTr" / "case_002.nii.gz"
    if os.geteuid() == 0:  # root reads any file: refuse this one the way the kernel would
        real_open = open

        def refusing_open(path, *args, **kwargs):
            if Path(path) == locked:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(nifti_module, "open", refusing_open, raising=False)
    else:
        locked.chmod(0)
    with pytest.raises(DatasetError) as err:
        read_layout(root)
    assert err.value.problems == [(str(locked), "permission denied")]


def test_unreadable_image_gets_its_own_reason(tmp_path: Path) -> None:
    root = _multiclass_dataset(tmp_path / "Dataset013_ImageLoop")
    image = root / "imagesTr" / "case_001_0000.nii.gz"
    image.unlink()
    image.symlink_to(image)
    with pytest.raises(DatasetError) as err:
        read_layout(root)
    assert err.value.problems == [(str(image), "symlink loop: the symlink never resolves to a file")]


def test_symlinked_files_and_folders_inside_the_dataset_are_read(tmp_path: Path) -> None:
    source = _multiclass_dataset(tmp_path / "disk2" / "Dataset014_Real")
    root = tmp_path / "Dataset014_Linked"
    root.mkdir()
    (root / "dataset.json").symlink_to(source / "dataset.json")
    (root / "imagesTr").symlink_to(source / "imagesTr")
    (root / "labelsTr").mkdir()
    for path in (source / "labelsTr").iterdir():
        (root / "labelsTr" / path.name).symlink_to(path)
    layout = read_layout(root)
    validate_layout(layout)
    assert layout.labelled_ids == ("case_000", "case_001", "case_002")
    np.testing.assert_array_equal(load_case(layout.get_case("case_001"), layout.class_ids).label, _multiclass(1))


def test_unlistable_labels_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _multiclass_dataset(tmp_path / "Dataset015_Unlistable")
    labels = root / "labelsTr"
    listing = Path.iterdir

    def iterdir(self):
        if self == labels:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(DatasetError) as err:
        read_layout(root)
    assert err.value.problems == [(str(labels), "cannot list folder: permission denied")]
