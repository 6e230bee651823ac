"""Sliding-window inference: tiling, coverage, weighting and agreement with whole-volume passes."""

import numpy as np
import pytest
import torch
from torch import nn

from semiseg.train.sliding_window import (accumulated_weights, importance_map, sliding_window_inference,
                                          tile_starts, tile_windows)

PATCH = (8, 8, 6)


def _pointwise(in_channels=2, num_classes=3):
    torch.manual_seed(0)
    model = nn.Conv3d(in_channels, num_classes, 1)
    with torch.no_grad():
        model.weight.mul_(4.0)
    return model.eval()


def _whole(model, image):
    with torch.no_grad():
        return torch.softmax(model(torch.as_tensor(image)[None]), dim=1)[0]


@pytest.mark.parametrize("shape", [(5, 7, 3), (8, 8, 6), (13, 21, 10), (16, 9, 17)])
@pytest.mark.parametrize("gaussian", [True, False])
def test_pointwise_model_matches_the_whole_volume_pass(shape, gaussian):
    model = _pointwise()
    image = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    result = sliding_window_inference(model, image, PATCH, overlap=0.5, batch_size=3, gaussian=gaussian)
    assert result.shape == (3, *shape)
    torch.testing.assert_close(result, _whole(model, image), atol=1e-5, rtol=0)


def test_overlap_zero_and_half_agree_for_a_pointwise_model():
    model = _pointwise()
    image = torch.randn(2, 19, 11, 14)
    none = sliding_window_inference(model, image, PATCH, overlap=0.0, num_classes=3)
    half = sliding_window_inference(model, image, PATCH, overlap=0.5, num_classes=3)
    torch.testing.assert_close(none, half, atol=1e-5, rtol=0)
    torch.testing.assert_close(half.sum(0), torch.ones(19, 11, 14), atol=1e-5, rtol=0)


class _TileConstant(nn.Module):
    """Predicts a different constant distribution for every tile (counts its calls)."""

    def __init__(self):
        super().__init__()
        self.tiles = 0

    def forward(self, x):
        out = torch.zeros(x.shape[0], 2, *x.shape[2:])
        for i in range(x.shape[0]):
            out[i, 0] = float(self.tiles % 3)
            self.tiles += 1
        return out


def test_overlapping_tiles_are_averaged_with_their_weights():
    model = _TileConstant()
    shape, patch = (12, 8, 8), (8, 8, 8)
    result = sliding_window_inference(model, torch.zeros(1, *shape), patch, overlap=0.5, batch_size=2,
                                      gaussian=False)
    starts = tile_starts(12, 8, 0.5)
    assert starts == [0, 4]
    assert model.tiles == 2
    p0 = torch.softmax(torch.tensor([0.0, 0.0]), 0)[0]
    p1 = torch.softmax(torch.tensor([1.0, 0.0]), 0)[0]
    torch.testing.assert_close(result[0, :4], torch.full((4, 8, 8), float(p0)))
    torch.testing.assert_close(result[0, 4:8], torch.full((4, 8, 8), float((p0 + p1) / 2)))
    torch.testing.assert_close(result[0, 8:], torch.full((4, 8, 8), float(p1)))


@pytest.mark.parametrize("size, patch, overlap", [(20, 8, 0.5), (20, 8, 0.0), (8, 8, 0.5), (5, 8, 0.5),
                                                  (33, 7, 0.25), (100, 16, 0.9)])
def test_tile_starts_cover_the_axis_with_the_last_tile_flush(size, patch, overlap):
    starts = tile_starts(size, patch, overlap)
    assert starts[0] == 0
    assert starts[-1] == max(size - patch, 0)
    assert starts == sorted(set(starts))
    step = max(1, int(patch * (1 - overlap)))
    assert all(b - a <= step for a, b in zip(starts, starts[1:]))
    covered = np.zeros(max(size, patch), bool)
    for s in starts:
        covered[s:s + patch] = True
    assert covered.all()


def test_tile_starts_spacing_and_invalid_overlap():
    assert tile_starts(20, 8, 0.5) == [0, 4, 8, 12]
    assert tile_starts(20, 8, 0.0) == [0, 6, 12]
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(20, 8, 1.0)


@pytest.mark.parametrize("shape", [(5, 7, 3), (8, 8, 6), (29, 17, 13)])
@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_weight_map_is_positive_everywhere(shape, overlap):
    weights = accumulated_weights(shape, PATCH, overlap, gaussian=True)
    assert weights.shape == shape
    assert (weights > 0).all()
    windows = tile_windows(tuple(max(s, p) for s, p in zip(shape, PATCH)), PATCH, overlap)
    assert all(w[i].stop - w[i].start == PATCH[i] for w in windows for i in range(3))


def test_gaussian_importance_map_shape_and_values():
    weights = importance_map((9, 8, 5))
    assert weights.shape == (9, 8, 5)
    assert float(weights.max()) == pytest.approx(1.0)
    assert float(weights[4, 3, 2]) == pytest.approx(float(weights[4, 4, 2]))
    assert float(weights[0, 0, 0]) < 1e-3 * float(weights[4, 3, 2])
    assert (weights > 0).all()
    torch.testing.assert_close(weights, weights.flip(0).flip(1).flip(2))
    assert (importance_map((4, 4, 4), gaussian=False) == 1).all()


def test_invalid_inputs_raise():
    model = _pointwise()
    with pytest.raises(ValueError, match=r"\[C, X, Y, Z\]"):
        sliding_window_inference(model, torch.zeros(2, 8, 8), PATCH)
    with pytest.raises(ValueError, match="patch_size"):
        sliding_window_inference(model, torch.zeros(2, 8, 8, 8), (8, 8))
    with pytest.raises(ValueError, match="num_classes"):
        sliding_window_inference(model, torch.zeros(2, 8, 8, 8), PATCH, num_classes=5)


def test_gaussian_weighting_trusts_the_nearer_tile_centre():
    model = _TileConstant()
    result = sliding_window_inference(model, torch.zeros(1, 12, 8, 8), (8, 8, 8), overlap=0.5, gaussian=True)
    p0 = float(torch.softmax(torch.tensor([0.0, 0.0]), 0)[0])
    p1 = float(torch.softmax(torch.tensor([1.0, 0.0]), 0)[0])
    profile = importance_map((8, 8, 8))[:, 3, 3]
    for x in range(4, 8):
        w0, w1 = float(profile[x]), float(profile[x - 4])
        expected = (w0 * p0 + w1 * p1) / (w0 + w1)
        assert float(result[0, x, 3, 3]) == pytest.approx(expected, abs=1e-6)
    assert abs(float(result[0, 4, 0, 0]) - p0) < abs(float(result[0, 4, 0, 0]) - p1)
    assert abs(float(result[0, 7, 0, 0]) - p1) < abs(float(result[0, 7, 0, 0]) - p0)
