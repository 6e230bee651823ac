"""Tests of the Medical Segmentation Decathlon reader, the layout dispatcher and extra unlabelled folders."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from semiseg.data import DatasetError, load_case, read_layout, validate_layout, write_case, write_dataset_json
from semiseg.data.formats import read_dataset
from semiseg.data.msd import is_msd_json, read_msd
from semiseg.data.prepared import prepare_split

SPACING = (0.8, 0.9, 2.5)
SHAPE = (10, 9, 4)
MSD_LABELS = {"0": "background", "1": "edema", "2": "tumour"}


def _oblique_affine() -> np.ndarray:
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(SPACING)
    affine[:3, 3] = (5.0, -3.0, 12.0)
    return affine


def _image(seed: int, channels: int = 2) -> np.ndarray:
    """MSD layout: [X, Y, Z, C] for several channels, [X, Y, Z] for one."""
    data = np.random.default_rng(seed).normal(50.0, 10.0, size=(*SHAPE, channels)).astype(np.float32)
    return data if channels > 1 else data[..., 0]


def _label(seed: int) -> np.ndarray:
    return np.random.default_rng(100 + seed).integers(0, 3, size=SHAPE).astype(np.uint8)


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*SPACING, 1.0]) if affine is None else affine), str(path))


def _write_msd(root: Path, channels: int = 2, n_labelled: int = 3) -> Path:
    """A Decathlon dataset: labelled cases, one entry without label, one test image, a macOS ._ file."""
    modality = {str(c): f"MR{c}" for c in range(channels)}
    training = []
    for k in range(n_labelled):
        affine = _oblique_affine() if k == 1 else None
        _save(root / "imagesTr" / f"brain_{k:03d}.nii.gz", _image(k, channels), affine)
        _save(root / "labelsTr" / f"brain_{k:03d}.nii.gz", _label(k), affine)
        training.append({"image": f"./imagesTr/brain_{k:03d}.nii.gz", "label": f"./labelsTr/brain_{k:03d}.nii.gz"})
    _save(root / "imagesTr" / "brain_050.nii.gz", _image(50, channels))
    training.append({"image": "./imagesTr/brain_050.nii.gz"})
    _save(root / "imagesTs" / "brain_900.nii.gz", _image(90, channels))
    (root / "imagesTr" / "._brain_000.nii.gz").write_bytes(b"\x00\x05\x16\x07 resource fork")
    meta = {"name": "BrainToy", "tensorImageSize": "4D" if channels > 1 else "3D", "modality": modality,
            "labels": MSD_LABELS, "numTraining": len(training), "numTest": 1, "training": training,
            "test": ["./imagesTs/brain_900.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _edit_json(root: Path, **changes: object) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.fixture()
def msd(tmp_path: Path) -> Path:
    return _write_msd(tmp_path / "Task01_BrainToy")


@pytest.fixture()
def nnunet(tmp_path: Path) -> Path:
    root = tmp_path / "Dataset002_Toy"
    write_dataset_json(root, "Toy", {"0": "T1", "1": "T2"}, {"background": 0, "fg": 1}, num_training=2)
    rng = np.random.default_rng(0)
    for k in range(2):
        write_case(root, f"case_{k}", rng.normal(size=(2, *SHAPE)), (rng.random(SHAPE) > 0.5), SPACING)
    write_case(root, "case_9", rng.normal(size=(2, *SHAPE)), None, SPACING, split="Ts")
    return root


def _messages(err: pytest.ExceptionInfo[DatasetError]) -> str:
    return str(err.value)


# --------------------------------------------------------------------------- reading


def test_msd_layout_is_read_into_the_common_layout(msd: Path) -> None:
    layout = read_dataset(msd)
    assert layout.layout_format == "msd" and layout.name == "BrainToy"
    assert layout.labels == {"background": 0, "edema": 1, "tumour": 2}, "MSD value->name must be inverted"
    assert layout.class_ids == (0, 1, 2)
    assert layout.channel_names == {"0": "MR0", "1": "MR1"} and layout.num_channels == 2
    assert layout.labelled_ids == ("brain_000", "brain_001", "brain_002")
    assert layout.unlabelled_ids == ("brain_050",)
    assert [c.case_id for c in layout.test] == ["brain_900"]
    assert all(c.packed_channels == 2 and len(c.image_paths) == 1 for c in layout.training + layout.test)


def test_four_dimensional_images_load_as_channels_first(msd: Path) -> None:
    layout = read_dataset(msd)
    for k in (0, 1):
        case = load_case(layout.get_case(f"brain_{k:03d}"), layout.class_ids)
        assert case.image.shape == (2, *SHAPE) and case.image.dtype == np.float32
        np.testing.assert_array_equal(case.image, np.moveaxis(_image(k), -1, 0))
        np.testing.assert_array_equal(case.label, _label(k))
        assert case.spacing == pytest.approx(SPACING, abs=1e-5)
    np.testing.assert_allclose(load_case(layout.get_case("brain_001")).affine, _oblique_affine(), atol=1e-4)
    assert load_case(layout.get_case("brain_050")).label is None
    validate_layout(layout)


def test_single_modality_msd_images_are_three_dimensional(tmp_path: Path) -> None:
    layout = read_dataset(_write_msd(tmp_path / "Task02", channels=1))
    case = load_case(layout.get_case("brain_002"), layout.class_ids)
    assert case.image.shape == (1, *SHAPE)
    np.testing.assert_array_equal(case.image[0], _image(2, 1))


def test_dispatcher_reads_nnunet_datasets_unchanged(nnunet: Path, msd: Path) -> None:
    assert read_dataset(nnunet) == read_layout(nnunet)
    assert read_dataset(nnunet).layout_format == "nnunet_v2"
    assert is_msd_json(msd / "dataset.json") and not is_msd_json(nnunet / "dataset.json")


def test_extra_unlabelled_folder_in_msd_naming(msd: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    for k in range(2):
        _save(extra / f"more_{k}.nii.gz", _image(200 + k))
    layout = read_dataset(msd, extra_unlabelled=extra)
    assert layout.unlabelled_ids == ("brain_050", "more_0", "more_1")
    assert layout.labelled_ids == ("brain_000", "brain_001", "brain_002")
    np.testing.assert_array_equal(load_case(layout.get_case("more_1")).image, np.moveaxis(_image(201), -1, 0))


def test_extra_unlabelled_folder_in_nnunet_naming(nnunet: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    write_case(extra, "pool_0", np.ones((2, *SHAPE)) * [[[[1.0]]], [[[2.0]]]], None, SPACING)
    layout = read_dataset(nnunet, extra_unlabelled=extra / "imagesTr")
    assert layout.unlabelled_ids == ("pool_0",)
    assert load_case(layout.get_case("pool_0")).image.shape == (2, *SHAPE)


def test_msd_split_and_prepare(msd: Path) -> None:
    layout = read_dataset(msd)
    data = prepare_split(layout, num_labelled=1, num_validation=1, num_test=1, split_seed=0, dims=2)
    assert data.labelled_images.shape == (SHAPE[2], 2, SHAPE[0], SHAPE[1])
    assert data.unlabelled_images.shape[0] == SHAPE[2], "the label-less entry is the unlabelled pool"
    assert len(data.validation) == len(data.test) == 1 and data.num_classes == 3
    assert data.split.unlabelled == ("brain_050",)


# --------------------------------------------------------------------------- malformed


def test_wrong_channel_count_against_modality(msd: Path) -> None:
    path = msd / "imagesTr" / "brain_002.nii.gz"
    _save(path, np.random.default_rng(0).normal(size=(*SHAPE, 3)).astype(np.float32))
    layout = read_dataset(msd)
    with pytest.raises(DatasetError) as err:
        load_case(layout.get_case("brain_002"))
    assert f"{path}: image has 3 channel(s)" in _messages(err) and "declares 2 modalities" in _messages(err)


def test_three_dimensional_image_where_several_modalities_are_declared(msd: Path) -> None:
    path = msd / "imagesTr" / "brain_000.nii.gz"
    _save(path, _image(0, channels=1))
    with pytest.raises(DatasetError) as err:
        validate_layout(read_dataset(msd))
    assert f"{path}: image has 1 channel(s)" in _messages(err) and "must be 4D" in _messages(err)


def test_five_dimensional_image(msd: Path) -> None:
    path = msd / "imagesTr" / "brain_000.nii.gz"
    _save(path, np.ones((*SHAPE, 2, 2), np.float32))
    with pytest.raises(DatasetError) as err:
        load_case(read_dataset(msd).get_case("brain_000"))
    assert f"{path}: expected a 3D image or a 4D [X, Y, Z, C] image" in _messages(err)


def test_nan_in_one_channel_of_a_packed_image(msd: Path) -> None:
    data = _image(0)
    data[1, 2, 3, 1] = np.inf
    path = msd / "imagesTr" / "brain_000.nii.gz"
    _save(path, data)
    with pytest.raises(DatasetError) as err:
        load_case(read_dataset(msd).get_case("brain_000"))
    assert _messages(err) == f"{path}: image channel 1 holds 1 NaN/Inf voxel(s)"


def test_constant_channel_of_a_packed_image(msd: Path) -> None:
    data = _image(0)
    data[..., 0] = 4.0
    path = msd / "imagesTr" / "brain_000.nii.gz"
    _save(path, data)
    with pytest.raises(DatasetError) as err:
        validate_layout(read_dataset(msd))
    assert f"{path}: constant image channel 0 (every voxel is 4)" in _messages(err)


def test_label_shape_differs_from_packed_image(msd: Path) -> None:
    path = msd / "labelsTr" / "brain_001.nii.gz"
    _save(path, np.zeros((10, 9, 3), np.uint8), _oblique_affine())
    with pytest.raises(DatasetError) as err:
        load_case(read_dataset(msd).get_case("brain_001"))
    assert f"{path}: label shape (10, 9, 3) does not match image shape (10, 9, 4)" in _messages(err)


def test_undeclared_label_value_in_msd(msd: Path) -> None:
    label = _label(2)
    label[0, 0, 0] = 5
    path = msd / "labelsTr" / "brain_002.nii.gz"
    _save(path, label)
    with pytest.raises(DatasetError) as err:
        validate_layout(read_dataset(msd))
    assert f"{path}: label values [5] are not declared" in _messages(err)


def test_duplicate_case_id_in_msd_training_list(msd: Path) -> None:
    meta = json.loads((msd / "dataset.json").read_text())
    _edit_json(msd, training=meta["training"] + [meta["training"][0]])
    with pytest.raises(DatasetError) as err:
        read_dataset(msd)
    assert f"{msd / 'imagesTr' / 'brain_000.nii.gz'}: duplicate case id 'brain_000'" in _messages(err)


def test_duplicate_case_id_between_training_and_test(nnunet: Path) -> None:
    write_case(nnunet, "case_1", np.ones((2, *SHAPE)), None, SPACING, split="Ts")
    with pytest.raises(DatasetError) as err:
        read_layout(nnunet)
    path = nnunet / "imagesTs" / "case_1_0000.nii.gz"
    assert _messages(err) == (f"{path}: duplicate case id 'case_1': {nnunet / 'imagesTr' / 'case_1_0000.nii.gz'} "
                              "already uses it; case ids must be unique")


def test_duplicate_case_id_between_extra_folder_and_training(msd: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    _save(extra / "brain_002.nii.gz", _image(7))
    with pytest.raises(DatasetError) as err:
        read_dataset(msd, extra_unlabelled=extra)
    assert f"{extra / 'brain_002.nii.gz'}: duplicate case id 'brain_002'" in _messages(err)


def test_missing_or_empty_extra_folder(msd: Path, nnunet: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        read_dataset(msd, extra_unlabelled=tmp_path / "absent")
    assert _messages(err) == f"{tmp_path / 'absent'}: extra unlabelled folder is missing"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no unlabelled images found"):
        read_dataset(nnunet, extra_unlabelled=tmp_path / "empty")


def test_nnunet_style_labels_in_msd_json(msd: Path) -> None:
    _edit_json(msd, labels={"background": 0, "edema": 1})
    with pytest.raises(DatasetError) as err:
        read_dataset(msd)
    assert f"{msd / 'dataset.json'}: label value 'background' (named 0) is not an integer" in _messages(err)


def test_msd_labels_without_background_or_with_repeated_names(msd: Path) -> None:
    _edit_json(msd, labels={"1": "tumour", "2": "tumour"})
    with pytest.raises(DatasetError) as err:
        read_dataset(msd)
    assert "label name 'tumour' is used for values 1 and 2" in _messages(err)
    assert 'must declare the background with value "0"' in _messages(err)


def test_listed_files_that_do_not_exist(msd: Path) -> None:
    (msd / "imagesTr" / "brain_001.nii.gz").unlink()
    (msd / "labelsTr" / "brain_002.nii.gz").unlink()
    with pytest.raises(DatasetError) as err:
        read_dataset(msd)
    assert err.value.problems == [
        (str(msd / "imagesTr" / "brain_001.nii.gz"), "image listed in dataset.json training[1] does not exist"),
        (str(msd / "labelsTr" / "brain_002.nii.gz"), "label listed in dataset.json training[2] does not exist"),
    ]


def test_listed_file_that_is_not_nifti(msd: Path) -> None:
    _edit_json(msd, test=["./imagesTs/brain_900.mha"])
    with pytest.raises(DatasetError) as err:
        read_dataset(msd)
    path = msd / "imagesTs" / "brain_900.mha"
    assert f"{path}: image listed in dataset.json test[0] is not a NIfTI" in _messages(err)


def test_empty_training_list(msd: Path) -> None:
    _edit_json(msd, training=[])
    with pytest.raises(DatasetError) as err:
        read_dataset(msd)
    assert _messages(err) == f'{msd / "dataset.json"}: the "training" list is empty: no training cases'


def test_malformed_training_entry_and_missing_modality(msd: Path) -> None:
    meta = json.loads((msd / "dataset.json").read_text())
    del meta["modality"]
    meta["training"][0] = "./imagesTr/brain_000.nii.gz"
    meta["training"][1]["label"] = 3
    (msd / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError) as err:
        read_msd(msd)
    text = _messages(err)
    assert "dataset.json is missing the required key 'modality'" in text
    assert 'training[0] must be an object with an "image" path' in text
    assert 'training[1] "label" must be a path or null, got 3' in text


def test_bad_modality_mapping(msd: Path) -> None:
    _edit_json(msd, modality={"1": "T1"})
    with pytest.raises(DatasetError, match='"modality" must map "0", "1", ...'):
        read_dataset(msd)


# --------------------------------------------------------------------------- entries outside the folder, links


def test_entries_leading_outside_the_dataset_folder_are_refused(msd: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.nii.gz"
    _save(outside, _image(7))
    _save(tmp_path / "outside_label.nii.gz", _label(7))
    meta = json.loads((msd / "dataset.json").read_text())
    meta["training"][0]["image"] = "../outside.nii.gz"
    meta["training"][1]["label"] = "./labelsTr/../../outside_label.nii.gz"
    meta["test"] = [str(outside)]
    (msd / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError) as err:
        read_dataset(msd)
    json_path = str(msd / "dataset.json")
    assert err.value.problems == [
        (json_path, f"training[0] image '../outside.nii.gz' resolves to {outside}, outside the dataset folder "
                    f"{msd}; entries must stay inside it"),
        (json_path, f"training[1] label './labelsTr/../../outside_label.nii.gz' resolves to "
                    f"{tmp_path / 'outside_label.nii.gz'}, outside the dataset folder {msd}; "
                    "entries must stay inside it"),
        (json_path, f"test[0] image {str(outside)!r} is an absolute path; entries must be relative to the dataset "
                    "folder"),
    ]


def test_dot_dot_through_a_symlinked_folder_is_refused(msd: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk2"
    (msd / "imagesTr").rename(disk)
    (msd / "imagesTr").symlink_to(disk)
    _save(tmp_path / "brain_000.nii.gz", _image(0))
    meta = json.loads((msd / "dataset.json").read_text())
    meta["training"][0]["image"] = "./imagesTr/../brain_000.nii.gz"  # the OS resolves imagesTr/.. to tmp_path
    (msd / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"training\[0\] image './imagesTr/../brain_000.nii.gz' resolves to "):
        read_dataset(msd)


def test_symlinks_placed_inside_the_dataset_are_followed(msd: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk2"
    disk.mkdir()
    (msd / "imagesTr").rename(disk / "imagesTr")
    (msd / "imagesTr").symlink_to(disk / "imagesTr")
    (msd / "labelsTr" / "brain_001.nii.gz").rename(disk / "brain_001_label.nii.gz")
    (msd / "labelsTr" / "brain_001.nii.gz").symlink_to(disk / "brain_001_label.nii.gz")
    linked_root = tmp_path / "Task01_Linked"
    linked_root.symlink_to(msd)
    for root in (msd, linked_root):
        layout = read_dataset(root)
        validate_layout(layout)
        assert layout.labelled_ids == ("brain_000", "brain_001", "brain_002")
        case = load_case(layout.get_case("brain_001"), layout.class_ids)
        np.testing.assert_array_equal(case.label, _label(1))
        np.testing.assert_allclose(case.affine, _oblique_affine(), atol=1e-5)


def test_unreadable_listed_files_get_their_reason(msd: Path, tmp_path: Path) -> None:
    label = msd / "labelsTr" / "brain_000.nii.gz"
    label.unlink()
    label.symlink_to(label)
    image = msd / "imagesTr" / "brain_002.nii.gz"
    image.unlink()
    image.symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(DatasetError) as err:
        read_dataset(msd)
    assert err.value.problems == [
        (str(label), "label listed in dataset.json training[0]: symlink loop: the symlink never resolves to a file"),
        (str(image), f"image listed in dataset.json training[2]: dangling symlink to {tmp_path / 'gone.nii.gz'} "
                     "(which does not exist)"),
    ]
