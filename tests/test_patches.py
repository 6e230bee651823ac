"""3D training patches: shapes, exact crops, foreground oversampling and padding."""

import numpy as np
import pytest

from semiseg.data.patches import PatchSampler, sample_patches, sample_patches_from_list


def _unique_volumes(n=2, channels=2, shape=(20, 18, 12)):
    """Volumes whose voxels all differ, so a crop reveals its offset."""
    size = int(np.prod(shape))
    return np.arange(n * channels * size, dtype=np.float32).reshape(n, channels, *shape)


def _offset(volume, value):
    """(channel, x, y, z) of ``value`` in a ``[C, X, Y, Z]`` volume of unique values."""
    return tuple(int(i) for i in np.argwhere(volume == value)[0])


def _blob_labels(n=2, shape=(32, 32, 32), corner=(20, 5, 9), side=3):
    labels = np.zeros((n, *shape), np.int64)
    labels[:, corner[0]:corner[0] + side, corner[1]:corner[1] + side, corner[2]:corner[2] + side] = 1
    return labels


def test_shapes_and_dtypes():
    volumes = _unique_volumes()
    labels = np.zeros((2, 20, 18, 12), np.int64)
    images, crops = sample_patches(volumes, labels, (8, 6, 4), 5, np.random.default_rng(0))
    assert images.shape == (5, 2, 8, 6, 4) and images.dtype == np.float32
    assert crops.shape == (5, 8, 6, 4) and crops.dtype == np.int64
    images, none = sample_patches(volumes, None, (8, 6, 4), 3, np.random.default_rng(0))
    assert images.shape == (3, 2, 8, 6, 4) and none is None


def test_crops_are_exact_sub_arrays_of_image_and_label():
    volumes = _unique_volumes()
    labels = (volumes[:, 0] % 7).astype(np.int64)
    patch = (8, 6, 4)
    images, crops = sample_patches(volumes, labels, patch, 20, np.random.default_rng(1), foreground_fraction=0.5)
    for image, crop in zip(images, crops):
        index = int(image[0, 0, 0, 0]) // volumes[0].size
        channel, x, y, z = _offset(volumes[index], image[0, 0, 0, 0])
        assert channel == 0
        window = (slice(x, x + 8), slice(y, y + 6), slice(z, z + 4))
        np.testing.assert_array_equal(image, volumes[index][(slice(None), *window)])
        np.testing.assert_array_equal(crop, labels[index][window])


def test_patch_equal_to_the_volume_is_the_volume():
    volumes = _unique_volumes(n=1, shape=(6, 5, 4))
    images, _ = sample_patches(volumes, None, (6, 5, 4), 2, np.random.default_rng(0))
    np.testing.assert_array_equal(images[0], volumes[0])
    np.testing.assert_array_equal(images[1], volumes[0])


def _foreground_rate(fraction, seed=0, count=600):
    volumes = np.random.default_rng(seed).normal(size=(2, 1, 32, 32, 32)).astype(np.float32)
    _, crops = sample_patches(volumes, _blob_labels(), (8, 8, 8), count, np.random.default_rng(seed),
                              foreground_fraction=fraction)
    return float(np.mean([(c > 0).any() for c in crops]))


def test_foreground_oversampling_raises_the_share_of_crops_with_foreground():
    plain = _foreground_rate(0.0)
    oversampled = _foreground_rate(0.33)
    assert plain < 0.15
    assert oversampled > plain + 0.2
    assert _foreground_rate(1.0) == 1.0


def test_foreground_centred_crops_keep_the_voxel_near_the_border():
    labels = np.zeros((1, 16, 16, 16), np.int64)
    labels[0, 0, 15, 7] = 2
    volumes = np.zeros((1, 1, 16, 16, 16), np.float32)
    _, crops = sample_patches(volumes, labels, (6, 6, 6), 10, np.random.default_rng(0), foreground_fraction=1.0)
    assert all((c == 2).sum() == 1 for c in crops)
    assert all(c[0, 5, 3] == 2 for c in crops)


def test_rare_classes_are_drawn_as_often_as_large_ones():
    labels = np.zeros((1, 40, 40, 40), np.int64)
    labels[0, :20] = 1
    labels[0, 35, 35, 35] = 2
    volumes = np.zeros((1, 1, 40, 40, 40), np.float32)
    _, crops = sample_patches(volumes, labels, (8, 8, 8), 200, np.random.default_rng(0), foreground_fraction=1.0)
    share = np.mean([(c == 2).any() for c in crops])
    assert 0.35 < share < 0.65


def test_volumes_smaller_than_the_patch_are_zero_padded_symmetrically():
    volume = np.arange(1, 1 + 2 * 4 * 10 * 3, dtype=np.float32).reshape(1, 2, 4, 10, 3)
    labels = np.ones((1, 4, 10, 3), np.int64)
    images, crops = sample_patches(volume, labels, (8, 6, 5), 30, np.random.default_rng(0))
    assert images.shape == (30, 2, 8, 6, 5)
    for image, crop in zip(images, crops):
        assert (image[:, :2] == 0).all() and (image[:, 6:] == 0).all()
        assert (image[:, :, :, 0] == 0).all() and (image[:, :, :, 4] == 0).all()
        assert (image[:, 2:6, :, 1:4] > 0).all()
        assert (crop[:2] == 0).all() and (crop[2:6, :, 1:4] == 1).all() and crop.sum() == 4 * 6 * 3
        y = _offset(volume[0], image[0, 2, 0, 1])[2]
        np.testing.assert_array_equal(image[:, 2:6, :, 1:4], volume[0][:, :, y:y + 6, :])


def test_list_variant_with_differently_shaped_volumes():
    shapes = [(10, 12, 8), (7, 16, 9), (12, 9, 5)]
    volumes, labels, offset = [], [], 1
    for shape in shapes:
        size = int(np.prod(shape))
        volumes.append(np.arange(offset, offset + size, dtype=np.float32).reshape(1, *shape))
        labels.append(np.zeros(shape, np.int64))
        labels[-1][1, 2, 3] = 1
        offset += size
    images, crops = sample_patches_from_list(volumes, labels, (6, 6, 6), 60, np.random.default_rng(3))
    assert images.shape == (60, 1, 6, 6, 6) and crops.shape == (60, 6, 6, 6)
    sources = set()
    for image, crop in zip(images, crops):
        values = image[image > 0]
        source = next(i for i, v in enumerate(volumes) if v.min() <= values.min() <= v.max())
        sources.add(source)
        assert values.max() <= volumes[source].max()
        assert len(values) == (216 if source < 2 else 180)
        np.testing.assert_array_equal(crop == 1, image[0] == volumes[source][0, 1, 2, 3])
    assert sources == {0, 1, 2}


def test_sampler_is_reproducible_and_validates_its_inputs():
    volumes = _unique_volumes()
    first = sample_patches(volumes, None, (4, 4, 4), 6, np.random.default_rng(7))[0]
    second = sample_patches(volumes, None, (4, 4, 4), 6, np.random.default_rng(7))[0]
    np.testing.assert_array_equal(first, second)
    with pytest.raises(ValueError, match="label shape"):
        PatchSampler(list(volumes), [np.zeros((3, 3, 3))] * 2, (4, 4, 4))
    with pytest.raises(ValueError, match="patch_size"):
        PatchSampler(list(volumes), None, (4, 4))
    with pytest.raises(ValueError, match="foreground_fraction"):
        PatchSampler(list(volumes), None, (4, 4, 4)).sample(2, np.random.default_rng(0), 1.5)
    with pytest.raises(ValueError, match=r"\[N, C, X, Y, Z\]"):
        sample_patches(volumes[0], None, (4, 4, 4), 1, np.random.default_rng(0))


def test_draw_names_each_patch_volume_origin_and_centre_position():
    volumes = [_unique_volumes(n=1, channels=1, shape=(10, 9, 12))[0], _unique_volumes(n=1, channels=1,
                                                                                       shape=(10, 9, 2))[0] + 1e6]
    sampler = PatchSampler(volumes, None, (4, 5, 6))
    drawn = sampler.draw(30, np.random.default_rng(2), 0.0)
    again = sampler.sample(30, np.random.default_rng(2), 0.0)[0]
    np.testing.assert_array_equal(drawn.images, again)
    assert drawn.origins.dtype == np.int64 and drawn.origins.shape == (30, 3) and set(drawn.volumes) == {0, 1}
    for image, volume, (x, y, z), position in zip(drawn.images, drawn.volumes, drawn.origins, drawn.positions):
        np.testing.assert_array_equal(image, sampler.volumes[volume][:, x:x + 4, y:y + 5, z:z + 6])
        if volume == 0:
            assert position == pytest.approx((z + 2.5) / 11)
        else:
            assert z == 0 and position == pytest.approx(0.5), "2 slices padded to 6: the centre is between them"
