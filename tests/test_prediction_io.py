"""Tests of prediction input and output: finding and reading a folder's cases, writing results."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from semiseg.data.errors import DatasetError
from semiseg.data.prediction_io import (
    InputCase,
    find_input_cases,
    read_input_case,
    write_label_map,
    write_probabilities,
)

SHAPE = (7, 6, 4)


def oblique_lps_affine() -> np.ndarray:
    """LPS, anisotropic (0.8, 1.1, 3.0) and rotated 20 deg about X and 15 deg about Z."""
    cx, sx = np.cos(np.radians(20.0)), np.sin(np.radians(20.0))
    cz, sz = np.cos(np.radians(15.0)), np.sin(np.radians(15.0))
    about_x = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    about_z = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = about_x @ about_z @ np.diag([-0.8, -1.1, 3.0])
    affine[:3, 3] = (40.0, 25.0, -30.0)
    return affine


def _write(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None,
           sform_code: int = 1, qform_code: int = 2) -> Path:
    data = np.random.default_rng(len(path.name)).normal(100.0, 20.0, SHAPE).astype(np.float32) \
        if data is None else data
    affine = oblique_lps_affine() if affine is None else affine
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=sform_code)
    image.set_qform(affine, code=qform_code)
    nib.save(image, path)
    return path


def _error(call) -> str:
    with pytest.raises(DatasetError) as info:
        call()
    return str(info.value)


# --------------------------------------------------------------------------- discovery


def test_nnunet_naming_with_two_channels(tmp_path) -> None:
    for case in ("liver_002", "liver_001"):
        for channel in (1, 0):
            _write(tmp_path / f"{case}_{channel:04d}.nii.gz")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".liver_003_0000.nii.gz.tmp.nii.gz").write_text("hidden temporary file")
    cases = find_input_cases(tmp_path, num_channels=2)
    assert cases == [
        InputCase("liver_001", (tmp_path / "liver_001_0000.nii.gz", tmp_path / "liver_001_0001.nii.gz")),
        InputCase("liver_002", (tmp_path / "liver_002_0000.nii.gz", tmp_path / "liver_002_0001.nii.gz")),
    ]


def test_one_channel_folders_in_both_namings(tmp_path) -> None:
    suffixed, plain = tmp_path / "suffixed", tmp_path / "plain"
    suffixed.mkdir()
    plain.mkdir()
    _write(suffixed / "a_0000.nii")
    _write(suffixed / "b_0000.nii")
    _write(plain / "patient_0001.nii.gz")
    _write(plain / "patient_0002.nii.gz")
    assert find_input_cases(suffixed, 1, file_ending=".nii") == [
        InputCase("a", (suffixed / "a_0000.nii",)), InputCase("b", (suffixed / "b_0000.nii",))]
    assert find_input_cases(plain, 1) == [
        InputCase("patient_0001", (plain / "patient_0001.nii.gz",)),
        InputCase("patient_0002", (plain / "patient_0002.nii.gz",))]
    assert [c.case_id for c in find_input_cases(suffixed, 1, file_ending=None)] == ["a", "b"]


def test_incomplete_and_stray_channels_name_each_file(tmp_path) -> None:
    _write(tmp_path / "a_0000.nii.gz")
    _write(tmp_path / "a_0001.nii.gz")
    _write(tmp_path / "b_0000.nii.gz")
    _write(tmp_path / "c_0000.nii.gz")
    _write(tmp_path / "c_0001.nii.gz")
    _write(tmp_path / "c_0002.nii.gz")
    _write(tmp_path / "scan.nii.gz")
    message = _error(lambda: find_input_cases(tmp_path, 2))
    lines = message.splitlines()
    assert len(lines) == 3
    assert f"{tmp_path / 'b_0001.nii.gz'}: missing: case 'b' has b_0000.nii.gz but not channel 0001" in lines
    assert any(line.startswith(str(tmp_path / "c_0002.nii.gz")) and "model takes 2 channel(s)" in line
               for line in lines)
    assert any(line.startswith(str(tmp_path / "scan.nii.gz")) and "{case}_{channel:04d}" in line
               for line in lines)


def test_mixed_naming_for_one_channel(tmp_path) -> None:
    _write(tmp_path / "a_0000.nii.gz")
    _write(tmp_path / "b.nii.gz")
    message = _error(lambda: find_input_cases(tmp_path, 1))
    assert message.splitlines() == [
        f"{tmp_path / 'b.nii.gz'}: name does not follow {{case}}_{{channel:04d}} (e.g. case_0000.nii.gz) "
        "like the other images of the folder"]


def test_duplicates_and_other_endings(tmp_path) -> None:
    _write(tmp_path / "a_0000.nii.gz")
    _write(tmp_path / "a_0000.nii")
    duplicate = _error(lambda: find_input_cases(tmp_path, 1, file_ending=None))
    assert duplicate == f"{tmp_path / 'a_0000.nii.gz'}: duplicate: case 'a' channel 0000 is also in a_0000.nii"
    other = _error(lambda: find_input_cases(tmp_path, 1))
    assert other == f"{tmp_path / 'a_0000.nii'}: ends in .nii but the input images must end in .nii.gz"


def test_empty_or_missing_folder(tmp_path) -> None:
    (tmp_path / "readme.md").write_text("no images here")
    assert _error(lambda: find_input_cases(tmp_path, 1)) == f"{tmp_path}: holds no NIfTI image ending in .nii.gz"
    missing = tmp_path / "nowhere"
    assert str(missing) in _error(lambda: find_input_cases(missing, 1))
    with pytest.raises(ValueError, match="file_ending"):
        find_input_cases(tmp_path, 1, file_ending=".mha")


# --------------------------------------------------------------------------- reading


def test_read_input_case_stacks_channels(tmp_path) -> None:
    first = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    case = InputCase("a", (_write(tmp_path / "a_0000.nii.gz", first), _write(tmp_path / "a_0001.nii.gz", -first)))
    image, reference = read_input_case(case)
    assert image.dtype == np.float32 and image.shape == (2, *SHAPE)
    assert np.array_equal(image[0], first) and np.array_equal(image[1], -first)
    assert np.array_equal(reference.affine, nib.load(case.files[0]).affine)
    assert reference.shape == SHAPE


def test_read_input_case_refuses_disagreeing_channels(tmp_path) -> None:
    shifted = oblique_lps_affine()
    shifted[0, 3] += 0.01
    case = InputCase("a", (
        _write(tmp_path / "a_0000.nii.gz"),
        _write(tmp_path / "a_0001.nii.gz", affine=shifted),
        _write(tmp_path / "a_0002.nii.gz", np.zeros((7, 6, 5), np.float32)),
        _write(tmp_path / "a_0003.nii.gz", np.zeros((*SHAPE, 2), np.float32)),
    ))
    (tmp_path / "a_0004.nii.gz").write_bytes(b"definitely not gzip")
    case = InputCase("a", (*case.files, tmp_path / "a_0004.nii.gz"))
    lines = _error(lambda: read_input_case(case)).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith(f"{tmp_path / 'a_0003.nii.gz'}: expected a 3D image, got shape (7, 6, 4, 2)")
    assert lines[1].startswith(f"{tmp_path / 'a_0004.nii.gz'}: not a readable NIfTI file")
    assert lines[2].startswith(f"{tmp_path / 'a_0001.nii.gz'}: affine differs from channel 0's (a_0000.nii.gz)")
    assert lines[3] == (f"{tmp_path / 'a_0002.nii.gz'}: shape (7, 6, 5) differs from (7, 6, 4) of channel 0 "
                        "(a_0000.nii.gz)")

    tiny_shift = oblique_lps_affine()
    tiny_shift[1, 3] += 5e-5
    within = InputCase("b", (_write(tmp_path / "b_0000.nii.gz"), _write(tmp_path / "b_0001.nii.gz", affine=tiny_shift)))
    assert read_input_case(within)[0].shape == (2, *SHAPE)


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize(("sform_code", "qform_code", "ending"), [(1, 2, ".nii.gz"), (2, 0, ".nii"), (0, 1, ".nii.gz")])
def test_label_map_keeps_the_input_geometry(tmp_path, sform_code, qform_code, ending) -> None:
    source = _write(tmp_path / f"scan_0000{ending}", sform_code=sform_code, qform_code=qform_code)
    _, reference = read_input_case(InputCase("scan", (source,)))
    labels = np.random.default_rng(0).choice(np.array([0, 1, 2, 4], dtype=np.int64), size=SHAPE)
    out = tmp_path / f"scan{ending}"
    write_label_map(labels, reference, out)
    written = nib.load(out)
    original = nib.load(source)
    assert np.array_equal(written.affine, original.affine)
    assert written.shape == SHAPE
    assert int(written.header["sform_code"]) == sform_code and int(written.header["qform_code"]) == qform_code
    assert np.array_equal(written.get_sform(), original.get_sform())
    assert np.allclose(written.get_qform(), original.get_qform(), atol=1e-5)
    assert written.get_data_dtype() == np.uint8
    data = np.asarray(written.dataobj)
    assert data.dtype == np.uint8 and np.array_equal(data, labels)
    assert set(np.unique(data)) <= {0, 1, 2, 4}
    assert written.header.get_slope_inter() in ((1.0, 0.0), (None, None))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_large_label_values_are_int16_and_bad_labels_refused(tmp_path) -> None:
    source = _write(tmp_path / "scan_0000.nii.gz")
    reference = nib.load(source)
    reference.header.set_slope_inter(2.0, 10.0)
    reference.header["cal_max"] = 400.0
    labels = np.zeros(SHAPE, np.int32)
    labels[1, 2, 3] = 300
    write_label_map(labels, reference, tmp_path / "big.nii.gz")
    written = nib.load(tmp_path / "big.nii.gz")
    assert written.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(written.dataobj), labels)
    assert written.header.get_slope_inter() == (None, None) and written.header["cal_max"] == 0.0
    with pytest.raises(ValueError, match=r"do not match the input's shape \(7, 6, 4\)"):
        write_label_map(np.zeros((7, 6, 5), np.uint8), reference, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="must be integers"):
        write_label_map(np.zeros(SHAPE, np.float32), reference, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match=r"\[0, 32767\], got \[-1, -1\]"):
        write_label_map(-np.ones(SHAPE, np.int16), reference, tmp_path / "x.nii.gz")
    assert not (tmp_path / "x.nii.gz").exists()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_probabilities_npz(tmp_path, dtype) -> None:
    probabilities = np.random.default_rng(1).dirichlet(np.ones(4), size=SHAPE).transpose(3, 0, 1, 2)
    path = tmp_path / "scan.npz"
    write_probabilities(probabilities, path, [0, 1, 2, 4], dtype=dtype)
    with np.load(path) as stored:
        assert stored["probabilities"].dtype == np.dtype(dtype)
        assert stored["probabilities"].shape == (4, *SHAPE)
        np.testing.assert_allclose(stored["probabilities"], probabilities, atol=1e-3)
        assert stored["class_ids"].tolist() == [0, 1, 2, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.npz"]
    with pytest.raises(ValueError, match="3 class ids for 4 probability channels"):
        write_probabilities(probabilities, path, [0, 1, 2])
