"""The augmentation rotates in the axial X–Y plane, in millimetres (issue 13, item 6)."""

import math

import pytest
import torch

from semiseg.augment import AugmentSettings, affine_from_parameters, sample_affine, warp


def _rotation(degrees: float, shape: tuple[int, ...], spacing: tuple[float, ...]) -> torch.Tensor:
    return affine_from_parameters(torch.tensor([math.radians(degrees)]), torch.ones(1),
                                  torch.zeros(1, len(shape)), shape, spacing)


def _legacy_rotation(degrees: float, dims: int) -> torch.Tensor:
    """The former matrix: rotation of affine_grid's first two rows in normalised coordinates."""
    angle = math.radians(degrees)
    theta = torch.zeros(1, dims, dims + 1)
    theta[0, 0, 0], theta[0, 0, 1] = math.cos(angle), -math.sin(angle)
    theta[0, 1, 0], theta[0, 1, 1] = math.sin(angle), math.cos(angle)
    if dims == 3:
        theta[0, 2, 2] = 1.0
    return theta


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 3.0)])
def test_3d_quarter_turn_maps_x_onto_y_and_keeps_z(spacing):
    shape = (16, 16, 8)
    theta = _rotation(90.0, shape, spacing)
    along_x = torch.zeros(1, 1, *shape)
    along_x[0, 0, :, 7:9, 3] = 1.0
    along_y = torch.zeros(1, 1, *shape)
    along_y[0, 0, 7:9, :, 3] = 1.0
    torch.testing.assert_close(warp(along_x, theta), along_y, atol=1e-4, rtol=0)
    along_z = torch.zeros(1, 1, *shape)
    along_z[0, 0, 7:9, 7:9, :] = 1.0
    torch.testing.assert_close(warp(along_z, theta), along_z, atol=1e-4, rtol=0)


def test_former_3d_matrix_turned_the_y_z_plane():
    """What the fix changes: the former matrix left the X line alone and moved a Y line onto Z."""
    shape = (16, 16, 16)
    along_x = torch.zeros(1, 1, *shape)
    along_x[0, 0, :, 7:9, 7:9] = 1.0
    torch.testing.assert_close(warp(along_x, _legacy_rotation(90.0, 3)), along_x, atol=1e-4, rtol=0)
    assert not torch.allclose(warp(along_x, _rotation(90.0, shape, (1.0, 1.0, 1.0))), along_x, atol=1e-2)


def test_2d_quarter_turn_maps_x_onto_y():
    shape = (16, 16)
    along_x = torch.zeros(1, 1, *shape)
    along_x[0, 0, :, 7:9] = 1.0
    along_y = torch.zeros(1, 1, *shape)
    along_y[0, 0, 7:9, :] = 1.0
    torch.testing.assert_close(warp(along_x, _rotation(90.0, shape, (1.0, 1.0))), along_y, atol=1e-4, rtol=0)


def _disc(shape: tuple[int, int], spacing: tuple[float, float], radius_mm: float) -> torch.Tensor:
    """A disc of ``radius_mm`` centred in the field of view (an ellipse in voxels when anisotropic)."""
    x = (torch.arange(shape[0]) + 0.5 - shape[0] / 2) * spacing[0]
    y = (torch.arange(shape[1]) + 0.5 - shape[1] / 2) * spacing[1]
    return ((x[:, None] ** 2 + y[None, :] ** 2) <= radius_mm ** 2).float()[None, None]


def _extents_mm(mask: torch.Tensor, spacing: tuple[float, float]) -> tuple[float, float]:
    inside = mask[0, 0] > 0.5
    return (float(inside.any(1).sum()) * spacing[0], float(inside.any(0).sum()) * spacing[1])


# (shape, spacing): the 96 × 64 grid at 1 × 1.5 mm has a square 96 mm field of view; the
# other two have a non-square one, where a rotation in normalised coordinates shears.
GRIDS = [((96, 64), (1.0, 1.5)), ((96, 64), (1.0, 1.0)), ((64, 64), (1.0, 1.5))]


@pytest.mark.parametrize(("shape", "spacing"), GRIDS)
def test_disc_stays_a_disc_in_millimetres(shape, spacing):
    disc = _disc(shape, spacing, radius_mm=25.0)
    before = _extents_mm(disc, spacing)
    after = _extents_mm(warp(disc, _rotation(45.0, shape, spacing)), spacing)
    assert before[0] == pytest.approx(50.0, abs=spacing[0]) and before[1] == pytest.approx(50.0, abs=spacing[1])
    assert after[0] == pytest.approx(before[0], abs=spacing[0])
    assert after[1] == pytest.approx(before[1], abs=spacing[1])


@pytest.mark.parametrize(("shape", "spacing"), GRIDS[1:])
def test_former_normalised_rotation_sheared_a_disc(shape, spacing):
    """The check above catches the former behaviour wherever the field of view is not square."""
    disc = _disc(shape, spacing, radius_mm=25.0)
    before = _extents_mm(disc, spacing)
    after = _extents_mm(warp(disc, _legacy_rotation(45.0, 2)), spacing)
    assert abs(after[0] - before[0]) > 3 * spacing[0] or abs(after[1] - before[1]) > 3 * spacing[1]


def test_sample_affine_rotates_only_x_y_in_3d():
    settings = AugmentSettings(rotation_deg=90.0, scale=0.2, shift=0.1, spacing=(0.8, 1.2, 3.0))
    theta = sample_affine(64, 3, settings, torch.Generator().manual_seed(0), shape=(40, 32, 12))
    # affine_grid's row/column 0 is the last tensor axis (Z): no coupling with X or Y.
    assert torch.count_nonzero(theta[:, 0, 1:3]) == 0 and torch.count_nonzero(theta[:, 1:3, 0]) == 0
    assert theta[:, 1:3, 1:3].abs().amax() > 0.5 and theta[:, 1, 2].abs().amax() > 0.5


def test_sample_affine_uses_spacing_and_shape():
    """A draw equals the matrix built from the same angle, scale and shifts in millimetres."""
    settings = AugmentSettings(rotation_deg=30.0, scale=0.1, shift=0.05, spacing=(0.7, 1.4, 2.0))
    shape = (50, 30, 20)
    theta = sample_affine(3, 3, settings, torch.Generator().manual_seed(5), shape=shape)
    gen = torch.Generator().manual_seed(5)
    angle = (torch.rand(3, generator=gen) * 2 - 1) * math.radians(30.0)
    scale = 1.0 + (torch.rand(3, generator=gen) * 2 - 1) * 0.1
    rows = torch.stack([(torch.rand(3, generator=gen) * 2 - 1) * 0.05 * 2 for _ in range(3)], dim=1)
    expected = affine_from_parameters(angle, scale, rows.flip(1), shape, settings.spacing)
    torch.testing.assert_close(theta, expected)
    # In mm the X–Y block is a scaled rotation: orthogonal columns of equal length.
    half = torch.tensor(shape[:2]) * torch.tensor(settings.spacing[:2]) / 2
    block = theta[:, 1:3, 1:3].flip(1).flip(2) * half[None, :, None] / half[None, None, :]
    gram = block.transpose(1, 2) @ block
    torch.testing.assert_close(gram, torch.eye(2).expand(3, 2, 2) / scale[:, None, None] ** 2)


def test_2d_square_isotropic_matrix_is_unchanged():
    """Seeds stay comparable: same draws, and on a square 1 mm grid the same matrix as before."""
    settings = AugmentSettings(rotation_deg=20.0, scale=0.1, shift=0.1)
    theta = sample_affine(4, 2, settings, torch.Generator().manual_seed(3), shape=(32, 32))
    gen = torch.Generator().manual_seed(3)
    angle = (torch.rand(4, generator=gen) * 2 - 1) * math.radians(20.0)
    scale = 1.0 + (torch.rand(4, generator=gen) * 2 - 1) * 0.1
    legacy = torch.zeros(4, 2, 3)
    legacy[:, 0, 0], legacy[:, 0, 1] = torch.cos(angle) / scale, -torch.sin(angle) / scale
    legacy[:, 1, 0], legacy[:, 1, 1] = torch.sin(angle) / scale, torch.cos(angle) / scale
    for row in range(2):
        legacy[:, row, 2] = (torch.rand(4, generator=gen) * 2 - 1) * 0.1 * 2
    torch.testing.assert_close(theta, legacy)


def test_shape_must_match_dims():
    with pytest.raises(ValueError, match="spatial axes"):
        sample_affine(1, 3, AugmentSettings(), None, shape=(8, 8))


SPACINGS = {"case_0": (1.0, 1.0, 2.0), "case_1": (1.25, 0.75, 3.0), "case_2": (0.5, 1.5, 2.5),
            "case_3": (0.8, 0.9, 4.0), "case_4": (1.1, 1.3, 1.0), "case_5": (0.6, 0.7, 2.2)}


@pytest.fixture()
def anisotropic_dataset(tmp_path):
    """Five labelled and one unlabelled case, each with its own spacing."""
    import numpy as np

    from semiseg.data import read_layout, write_case, write_dataset_json

    root = tmp_path / "Dataset011_Spacing"
    write_dataset_json(root, "Spacing", {"0": "MRI"}, {"background": 0, "fg": 1}, num_training=5)
    for k, (case_id, spacing) in enumerate(SPACINGS.items()):
        rng = np.random.default_rng(k)
        image = rng.normal(0.0, 1.0, size=(1, 8, 8, 4)).astype(np.float32)
        label = (rng.random((8, 8, 4)) > 0.5).astype(np.int16)
        write_case(root, case_id, image, label if k < 5 else None, spacing)
    return read_layout(root)


@pytest.mark.parametrize(("loader", "cached"), [("memory", False), ("memory", True), ("stream", True)])
def test_training_spacing_is_the_median_of_the_labelled_cases(anisotropic_dataset, tmp_path, loader, cached,
                                                               tiny_config):
    import numpy as np

    from semiseg.data.prepared import prepare_split
    from semiseg.methods.registry import experiment_config
    from semiseg.train.build import build_context

    data = prepare_split(anisotropic_dataset, num_labelled=3, num_validation=1, num_test=1, split_seed=0, dims=2,
                         cache_root=tmp_path / "cache" if cached else None, loader=loader)
    assert len(data.split.labelled) == 3
    expected = np.median([SPACINGS[case_id] for case_id in data.split.labelled], axis=0)
    assert data.training_spacing == pytest.approx(tuple(expected))
    assert data.training_spacing != pytest.approx((1.0, 1.0, 1.0))
    context = build_context(experiment_config(tiny_config), data, torch.device("cpu"))
    assert context.augment.spacing == data.training_spacing


def test_transform_consistency_rotation_keeps_the_spacing():
    from semiseg.methods.transform_consistency import TransformConsistencyParams, sample_transform

    augment = AugmentSettings(spacing=(1.0, 1.5, 3.0))
    images = torch.zeros(2, 1, 96, 64)
    got = sample_transform("rotation", images, TransformConsistencyParams(rotation_deg=30.0), augment, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    angle = (torch.rand(2, generator=gen) * 2 - 1) * math.radians(30.0)
    expected = affine_from_parameters(angle, torch.ones(2), torch.zeros(2, 2), (96, 64), (1.0, 1.5))
    torch.testing.assert_close(got.theta, expected)
