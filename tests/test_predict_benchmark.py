"""The prediction-throughput benchmark: semiseg's sliding-window inference agrees with MONAI's.

Skipped without MONAI (the optional ``bench`` extra). No timing is asserted: only the
agreement, the window placement both implementations share (or not), the structural
reason MONAI's own Gaussian map differs, and the section's output format.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("monai")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import predict_throughput as bench  # noqa: E402
from semiseg.train.sliding_window import importance_map, tile_windows  # noqa: E402

TINY = bench.PredictSettings(volume=(32, 24, 16), patch=(16, 16, 8), overlap=0.5, mismatched_volume=(36, 24, 16),
                             batch_size=4, width=4, depth=2, threads=1, min_repeats=1, max_repeats=1, budget_s=0.0,
                             blending_repeats=1)
"""size - patch (16, 8, 8) is a multiple of the step (8, 8, 4) on every axis: 3 x 2 x 3 windows, placed
alike. Along X, 36 - 16 = 20 is not: semiseg spaces 4 windows evenly (0, 7, 13, 20), MONAI steps by
8 and moves the last back (0, 8, 16, 20)."""


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    """A small semiseg 3D U-Net (width 4, depth 2), eval mode, confident head."""
    torch.set_num_threads(1)
    return bench.benchmark_network(TINY)


def test_windows_match_on_the_benchmark_volume_and_differ_on_the_mismatched_one():
    assert bench.same_windows(TINY.volume, TINY.patch, TINY.overlap)
    assert len(tile_windows(TINY.volume, TINY.patch, TINY.overlap)) == 3 * 2 * 3
    assert not bench.same_windows(TINY.mismatched_volume, TINY.patch, TINY.overlap)
    starts = sorted({window[0].start for window in bench.monai_windows(TINY.mismatched_volume, TINY.patch, 0.5)})
    assert starts == [0, 8, 16, 20]
    semiseg_starts = sorted({window[0].start for window in tile_windows(TINY.mismatched_volume, TINY.patch, 0.5)})
    assert semiseg_starts == [0, 7, 13, 20]


def test_default_settings_place_the_same_windows():
    for settings in (bench.PredictSettings(), bench.PredictSettings.quick()):
        assert bench.same_windows(settings.volume, settings.patch, settings.overlap)
        assert not bench.same_windows(settings.mismatched_volume, settings.patch, settings.overlap)


def test_semiseg_and_monai_agree_to_1e_4_with_the_same_windows_and_gaussian(tiny_model):
    image = bench.benchmark_image(TINY.volume, seed=3)
    device = torch.device("cpu")
    ours = bench.semiseg_prediction(tiny_model, image, TINY, device)
    theirs = bench.monai_prediction(tiny_model, image, TINY, device, importance_map(TINY.patch))
    assert ours.shape == theirs.shape == (4, *TINY.volume)
    assert torch.allclose(ours.sum(0), torch.ones(TINY.volume), atol=1e-5)
    assert bench.difference(ours, theirs)["max_abs_difference"] <= bench.MAX_DIFFERENCE
    assert ours.max(0).values.mean() > 0.6, "the scaled head makes the network confident"


def test_monai_own_gaussian_differs_only_by_its_clamp_and_that_breaks_1e_4(tiny_model):
    record = bench.map_differences(TINY.patch)
    assert record["monai map: max |map - clamp(semiseg map x max, 1e-3)|"] < 1e-6
    assert 0.3 < record["monai map: share of voxels clamped to 1e-3"] < 0.9
    image = bench.benchmark_image(TINY.volume, seed=3)
    device = torch.device("cpu")
    ours = bench.semiseg_prediction(tiny_model, image, TINY, device)
    theirs = bench.monai_prediction(tiny_model, image, TINY, device, None)
    assert bench.difference(ours, theirs)["max_abs_difference"] > bench.MAX_DIFFERENCE


def test_section_reports_figures_ratios_and_the_agreement_check():
    record = bench.run(TINY).to_dict()
    for name in ("semiseg cases/s", "monai cases/s", "semiseg blending-only cases/s", "monai blending-only cases/s"):
        figure = record["figures"][name]
        assert figure["unit"] == "cases/s" and figure["n"] == 1
        assert math.isfinite(figure["median"]) and figure["median"] > 0
    ratio = record["ratios"]["semiseg / MONAI"]
    assert ratio["value"] == pytest.approx(record["figures"]["semiseg cases/s"]["median"]
                                           / record["figures"]["monai cases/s"]["median"], rel=1e-9)
    (check,) = record["checks"]
    assert check["passed"] and check["measured"] <= 1e-4 and check["target"] == 1e-4
    assert record["extra"]["36x24x16: windows identical"] == "False"
    assert record["extra"]["32x24x16, same windows, MONAI's own map (clamped at 1e-3): max_abs_difference"] > 1e-4


def test_latest_md_keeps_other_sections_and_replaces_its_own():
    existing = ("# semiseg benchmarks\n\n## step: Step\n\nstep table\n\n## predict: old\n\nold figures\n\n"
                "## ema: EMA\n\nema\n")
    block = "## predict: new\n\nnew figures\n"
    updated = bench.replace_section(existing, block)
    assert updated == ("# semiseg benchmarks\n\n## step: Step\n\nstep table\n\n## predict: new\n\nnew figures\n\n"
                       "## ema: EMA\n\nema\n")
    appended = bench.replace_section("# semiseg benchmarks\n\n## step: Step\n\nstep table\n", block)
    assert appended == "# semiseg benchmarks\n\n## step: Step\n\nstep table\n\n## predict: new\n\nnew figures\n"
    assert bench.replace_section(appended, block) == appended
