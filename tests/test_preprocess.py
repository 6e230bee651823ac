"""Tests of the per-case preprocessing transforms (orientation, crop, resampling, normalisation)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from semiseg.data import LoadedCase, load_case, read_layout, write_case, write_dataset_json
from semiseg.data.preprocess import (
    PreprocessSettings,
    body_box,
    body_mask,
    crop,
    normalise,
    preprocess_case,
    resample,
    resampled_shape,
    spacing_of,
    to_canonical,
)

SPACING = (1.0, 1.0, 3.0)


def _volume(seed: int, shape: tuple[int, ...] = (2, 12, 10, 5)) -> np.ndarray:
    return np.random.default_rng(seed).normal(200.0, 30.0, size=shape).astype(np.float32)


def _lps(affine_ras: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The affine of the same voxels stored with X and Y reversed (an LPS-like file)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = shape[0] - 1, shape[1] - 1
    return affine_ras @ flip


def _world(affine: np.ndarray, index: tuple[int, int, int]) -> np.ndarray:
    return (affine @ np.array([*index, 1.0]))[:3]


# --------------------------------------------------------------------------- settings


def test_settings_defaults_and_round_trip() -> None:
    settings = PreprocessSettings(target_spacing=[1, 1, 3], normalisation="ct", ct_window=[-100, 300],
                                  crop_to_body=True, dims=3, image_order=3)
    assert settings.target_spacing == (1.0, 1.0, 3.0) and settings.ct_window == (-100.0, 300.0)
    assert PreprocessSettings.from_dict(settings.to_dict()) == settings
    assert PreprocessSettings().to_dict() == {"target_spacing": None, "normalisation": "zscore",
                                              "ct_window": [-1000.0, 1000.0], "crop_to_body": False,
                                              "dims": 2, "image_order": 1}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target_spacing": (1.0, 0.0, 3.0)}, "target_spacing must be 3 positive"),
    ({"target_spacing": (1.0, 3.0)}, "target_spacing must be 3 positive"),
    ({"normalisation": "minmax"}, "normalisation must be one of"),
    ({"ct_window": (100.0, -100.0)}, "lo < hi"),
    ({"dims": 4}, "dims must be 2 or 3"),
    ({"image_order": 2}, "image_order must be 1"),
])
def test_settings_reject_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreprocessSettings(**kwargs)


# --------------------------------------------------------------------------- orientation


def test_lps_flipped_affine_gives_the_same_canonical_array() -> None:
    image = _volume(0)
    label = (image[0] > 200).astype(np.int16)
    ras = np.diag([*SPACING, 1.0])
    ras[:3, 3] = (-5.0, 7.0, 2.0)
    lps = _lps(ras, image.shape[1:])
    flipped_image = np.ascontiguousarray(image[:, ::-1, ::-1, :])
    flipped_label = np.ascontiguousarray(label[::-1, ::-1, :])
    assert np.allclose(_world(lps, (0, 0, 0)), _world(ras, (11, 9, 0))), "the fixture describes the same voxels"
    canon_image, canon_label, canon_affine = to_canonical(flipped_image, flipped_label, lps)
    np.testing.assert_array_equal(canon_image, image)
    np.testing.assert_array_equal(canon_label, label)
    np.testing.assert_allclose(canon_affine, ras)
    same_image, same_label, same_affine = to_canonical(image, label, ras)
    assert same_image is image and same_label is label and same_affine is ras


def test_permuted_axes_are_brought_back_to_x_y_z() -> None:
    image = _volume(1, (1, 4, 5, 6))
    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 0], affine[2, 1], affine[3, 3] = 3.0, 1.0, 2.0, 1.0
    stored = np.ascontiguousarray(np.transpose(image, (0, 2, 3, 1)))
    canon, _, canon_affine = to_canonical(stored, None, affine)
    np.testing.assert_array_equal(canon, image)
    assert spacing_of(canon_affine) == pytest.approx((3.0, 1.0, 2.0))


def test_spacing_of_oblique_affine() -> None:
    angle = np.deg2rad(35.0)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, 0.8, 2.5])
    assert spacing_of(affine) == pytest.approx((0.7, 0.8, 2.5))


# --------------------------------------------------------------------------- resampling


def test_resampling_halves_the_in_plane_shape() -> None:
    assert resampled_shape((12, 10, 5), (1.0, 1.0, 3.0), (2.0, 2.0, 3.0)) == (6, 5, 5)
    assert resampled_shape((7, 7, 1), (1.0, 1.0, 1.0), (0.5, 3.0, 4.0)) == (14, 2, 1)
    image = _volume(2)
    out = resample(image, (6, 5, 5), 1)
    assert out.shape == (2, 6, 5, 5) and out.dtype == np.float32
    block_mean = image.reshape(2, 6, 2, 5, 2, 5).mean(axis=(2, 4))
    np.testing.assert_allclose(out, block_mean, rtol=1e-5, err_msg="linear 2:1 takes the mean of voxel pairs")


def test_label_resampling_is_nearest_and_keeps_values() -> None:
    rng = np.random.default_rng(3)
    blocks = rng.choice(np.array([0, 2, 7], np.int16), size=(6, 5, 5))
    label = np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)
    down = resample(label, (6, 5, 5), 0)
    np.testing.assert_array_equal(down, blocks)
    up = resample(label, (25, 21, 9), 0)
    assert up.dtype == np.int16 and set(np.unique(up)) <= {0, 2, 7}


def test_cubic_resampling_is_smooth_on_a_ramp() -> None:
    ramp = np.broadcast_to(np.arange(12, dtype=np.float32)[:, None, None], (12, 6, 3)).copy()
    out = resample(ramp, (24, 6, 3), 3)
    assert out.shape == (24, 6, 3)
    inner = out[8:-8, 0, 0]
    np.testing.assert_allclose(np.diff(inner), 0.5, atol=2e-3)
    np.testing.assert_allclose(inner, np.arange(8, 16) / 2.0 - 0.25, atol=2e-3)


def test_bool_mask_resampling() -> None:
    mask = np.zeros((8, 8, 2), bool)
    mask[2:6, 2:6] = True
    out = resample(mask, (4, 4, 2), 0)
    assert out.dtype == np.bool_ and out[1:3, 1:3].all() and out.sum() == 4 * 2


# --------------------------------------------------------------------------- crop and normalisation


def test_body_mask_box_and_crop() -> None:
    image = np.zeros((2, 10, 8, 4), np.float32)
    image[0, 2:7, 3:5, 1:3] = 5.0
    image[1, 8, 6, 3] = 1.0
    mask = body_mask(image)
    assert mask.sum() == 5 * 2 * 2 + 1
    assert body_box(mask) == ((2, 9), (3, 7), (1, 4))
    assert crop(image, body_box(mask)).shape == (2, 7, 4, 3)
    with pytest.raises(ValueError, match="constant image"):
        body_box(body_mask(np.full((1, 3, 3, 3), 2.0)))


def test_zscore_per_channel() -> None:
    image = _volume(4) * np.array([1.0, 50.0], np.float32)[:, None, None, None]
    out = normalise(image, "zscore")
    for channel in out:
        assert float(channel.mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(channel.std()) == pytest.approx(1.0, abs=1e-4)


def test_zscore_over_body_voxels() -> None:
    image = np.zeros((1, 10, 10, 3), np.float32)
    image[0, 2:8, 2:8] = np.random.default_rng(5).normal(500.0, 40.0, size=(6, 6, 3))
    out = normalise(image, "zscore_nonzero")
    body = out[0, 2:8, 2:8]
    assert float(body.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(body.std()) == pytest.approx(1.0, abs=1e-4)
    out[0, 2:8, 2:8] = 0.0
    assert not out.any(), "voxels outside the body are set to 0"


def test_ct_window() -> None:
    image = np.array([-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0], np.float32).reshape(1, 6, 1, 1)
    out = normalise(image, "ct", (-1000.0, 1000.0))
    np.testing.assert_allclose(out.ravel(), [0.0, 0.0, 0.5, 0.75, 1.0, 1.0])


def test_constant_channel_cannot_be_z_scored() -> None:
    image = _volume(6)
    image[1] = 3.0
    with pytest.raises(ValueError, match="constant image channel 1"):
        normalise(image, "zscore")


# --------------------------------------------------------------------------- whole case from disk


def _dataset(root: Path, affine: np.ndarray, image: np.ndarray, label: np.ndarray) -> LoadedCase:
    write_dataset_json(root, "Pre", {"0": "T1", "1": "T2"}, {"background": 0, "organ": 1, "lesion": 2}, 1)
    write_case(root, "case_0", image, label, spacing_of(affine), affine=affine)
    layout = read_layout(root)
    return load_case(layout.training[0], layout.class_ids)


def _phantom_case(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((2, 16, 12, 5), np.float32)
    rng = np.random.default_rng(seed)
    image[:, 2:14, 2:10] = rng.normal(300.0, 25.0, size=(2, 12, 8, 5))
    label = np.zeros((16, 12, 5), np.int16)
    label[4:10, 4:8, 1:4] = 1
    label[6:8, 5:7, 2] = 2
    return image, label


def test_preprocess_case_from_disk_resamples_crops_and_normalises(tmp_path: Path) -> None:
    image, label = _phantom_case()
    case = _dataset(tmp_path / "ras", np.diag([*SPACING, 1.0]), image, label)
    settings = PreprocessSettings(target_spacing=(2.0, 2.0, 3.0), normalisation="zscore_nonzero", crop_to_body=True)
    out = preprocess_case(case, settings)
    assert out.crop_box == ((2, 14), (2, 10), (0, 5))
    assert out.image.shape == (2, 6, 4, 5) and out.label.shape == (6, 4, 5)
    assert out.spacing == pytest.approx((2.0, 2.0, 3.0))
    assert out.original_shape == (16, 12, 5) and out.original_spacing == pytest.approx(SPACING)
    assert set(np.unique(out.label)) <= {0, 1, 2} and (out.label == 1).any()
    assert out.image.dtype == np.float32 and out.label.dtype == np.int16
    for channel in out.image:
        assert float(channel.mean()) == pytest.approx(0.0, abs=1e-4)
        assert float(channel.std()) == pytest.approx(1.0, abs=1e-3)
    assert out.intensity_range[0][0] == 0.0 and out.intensity_range[0][1] == pytest.approx(image[0].max())


def test_lps_file_preprocesses_like_the_ras_file(tmp_path: Path) -> None:
    image, label = _phantom_case(8)
    ras = np.diag([*SPACING, 1.0])
    lps = _lps(ras, image.shape[1:])
    settings = PreprocessSettings(target_spacing=(2.0, 2.0, 3.0), crop_to_body=True)
    from_ras = preprocess_case(_dataset(tmp_path / "ras", ras, image, label), settings)
    from_lps = preprocess_case(_dataset(tmp_path / "lps", lps, np.ascontiguousarray(image[:, ::-1, ::-1]),
                                        np.ascontiguousarray(label[::-1, ::-1])), settings)
    assert nib.aff2axcodes(lps) == ("L", "P", "S")
    np.testing.assert_allclose(from_lps.image, from_ras.image, atol=1e-5)
    np.testing.assert_array_equal(from_lps.label, from_ras.label)
    assert from_lps.spacing == pytest.approx(from_ras.spacing)


def test_preprocess_without_resampling_keeps_the_grid(tmp_path: Path) -> None:
    image, label = _phantom_case(9)
    out = preprocess_case(_dataset(tmp_path / "d", np.diag([*SPACING, 1.0]), image, label),
                          PreprocessSettings(normalisation="ct", ct_window=(0.0, 400.0)))
    assert out.image.shape == image.shape and out.crop_box is None
    np.testing.assert_allclose(out.image, np.clip(image, 0.0, 400.0) / 400.0, atol=1e-6)
    np.testing.assert_array_equal(out.label, label)
