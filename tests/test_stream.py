"""Streaming the unlabelled pool from the Parquet cache: bounded memory, disjoint ranks, exact epochs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from semiseg.data import DatasetLayout, read_layout, write_case, write_dataset_json
from semiseg.data.batches import MixedBatchSampler
from semiseg.data.errors import DatasetError
from semiseg.data.prepared import prepare_split
from semiseg.data.stream import LazyCases, StreamedPool, pad_sample

SPLIT = {"num_labelled": 2, "num_validation": 1, "num_test": 1, "split_seed": 0, "dims": 2}
DEPTHS = (4, 5, 3, 6, 4, 5, 3, 4, 6, 5)


@pytest.fixture()
def dataset(tmp_path: Path) -> DatasetLayout:
    """Four labelled cases and six unlabelled ones, every slice distinguishable by its mean."""
    root = tmp_path / "Dataset010_Stream"
    write_dataset_json(root, "Stream", {"0": "MRI"}, {"background": 0, "fg": 1}, num_training=4)
    for k, depth in enumerate(DEPTHS):
        rng = np.random.default_rng(k)
        image = rng.normal(0.0, 1.0, size=(1, 8, 8, depth)).astype(np.float32)
        image += (np.arange(depth, dtype=np.float32) * 10 + k * 100)[None, None, None]
        label = (rng.random((8, 8, depth)) > 0.5).astype(np.int16)
        write_case(root, f"case_{k}", image, label if k < 4 else None, (1.0, 1.0, 2.0))
    return read_layout(root)


def _rows(images: np.ndarray) -> set[bytes]:
    return {sample.tobytes() for sample in images}


def test_streamed_split_keeps_labels_in_memory_and_streams_the_rest(dataset, tmp_path):
    memory = prepare_split(dataset, cache_root=tmp_path / "cache", loader="memory", **SPLIT)
    streamed = prepare_split(dataset, cache_root=tmp_path / "cache", loader="stream", stream_buffer_rows=5, **SPLIT)
    np.testing.assert_array_equal(streamed.labelled_images, memory.labelled_images)
    np.testing.assert_array_equal(streamed.labelled_labels, memory.labelled_labels)
    assert streamed.unlabelled_images.shape == (0, 1, 8, 8)
    assert streamed.num_unlabelled == memory.num_unlabelled == len(memory.unlabelled_images) > 0
    assert isinstance(streamed.validation, LazyCases) and isinstance(streamed.test, LazyCases)
    for got, want in zip([*streamed.validation, *streamed.test], memory.validation + memory.test):
        assert got.case_id == want.case_id
        np.testing.assert_array_equal(got.image, want.image)
        np.testing.assert_array_equal(got.label, want.label)

    pool = streamed.unlabelled_stream.open(rank=0, world_size=1, seed=0)
    pool.start_epoch(0)
    drawn = pool.draw(4).images
    assert drawn.shape == (4, 1, 8, 8) and _rows(drawn) <= _rows(memory.unlabelled_images)
    assert pool.peak_rows == 5, "memory is bounded by the buffer"
    assert pool.dataset.rows_read < len(memory.unlabelled_images), "only what the buffer needs is read"


def test_a_pass_draws_each_row_once_before_repeating(dataset, tmp_path):
    data = prepare_split(dataset, cache_root=tmp_path / "cache", loader="stream", stream_buffer_rows=4, **SPLIT)
    pool = data.unlabelled_stream.open(rank=0, world_size=1, seed=1)
    pool.start_epoch(0)
    total = data.num_unlabelled
    drawn = [pool.draw(1).images[0].tobytes() for _ in range(total - pool.buffer_rows + 1)]
    assert len(set(drawn)) == len(drawn), "no row is drawn twice within a pass"


def test_epochs_are_reproducible_and_differ(dataset, tmp_path):
    data = prepare_split(dataset, cache_root=tmp_path / "cache", loader="stream", stream_buffer_rows=6, **SPLIT)
    first, second = (data.unlabelled_stream.open(0, 1, seed=3) for _ in range(2))
    first.start_epoch(0)
    epoch0 = [first.draw(3).images for _ in range(5)]
    first.start_epoch(1)
    epoch1 = [first.draw(3).images for _ in range(5)]
    second.start_epoch(1)
    np.testing.assert_array_equal(np.stack([second.draw(3).images for _ in range(5)]), np.stack(epoch1))
    assert not np.array_equal(np.stack(epoch0), np.stack(epoch1))


def test_ranks_stream_disjoint_rows_whose_union_is_the_pool(dataset, tmp_path):
    """Each pass deals the pool's row groups to the ranks in one order (a new order each pass,
    as a distributed sampler reshuffles per epoch)."""
    data = prepare_split(dataset, cache_root=tmp_path / "cache", loader="stream", stream_buffer_rows=4, **SPLIT)
    memory = prepare_split(dataset, cache_root=tmp_path / "cache", loader="memory", **SPLIT)
    passes = []
    for rank in (0, 1):
        pool = data.unlabelled_stream.open(rank, 2, seed=0)
        pool.start_epoch(0)
        passes.append([row.image for row in pool._rows])
    shares = [_rows(np.stack(rows)) for rows in passes]
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == _rows(memory.unlabelled_images)
    assert sum(map(len, passes)) == len(memory.unlabelled_images)


def test_sampler_takes_unlabelled_batches_from_the_stream(dataset, tmp_path):
    data = prepare_split(dataset, cache_root=tmp_path / "cache", loader="stream", stream_buffer_rows=8, **SPLIT)
    memory = prepare_split(dataset, cache_root=tmp_path / "cache", loader="memory", **SPLIT)
    sampler = MixedBatchSampler(data.labelled_images, data.labelled_labels, data.unlabelled_images, 2, 3,
                                unlabelled_stream=data.unlabelled_stream)
    batches = list(sampler.epoch(0, steps=4))
    assert all(b["image_u"].shape == (3, 1, 8, 8) and b["image_l"].shape == (2, 1, 8, 8) for b in batches)
    assert _rows(np.concatenate([b["image_u"].numpy() for b in batches])) <= _rows(memory.unlabelled_images)
    again = list(sampler.epoch(0, steps=4))
    assert all(np.array_equal(a["image_u"], b["image_u"]) for a, b in zip(batches, again))


def test_auto_streams_only_past_the_memory_budget(dataset, tmp_path):
    small = prepare_split(dataset, cache_root=tmp_path / "cache", loader="auto", memory_budget_mb=1e-4, **SPLIT)
    large = prepare_split(dataset, cache_root=tmp_path / "cache", loader="auto", memory_budget_mb=1.0, **SPLIT)
    assert small.unlabelled_stream is not None and large.unlabelled_stream is None
    assert len(large.unlabelled_images) == small.num_unlabelled


def test_bad_loader_settings_are_named(dataset, tmp_path):
    with pytest.raises(DatasetError, match="data.loader.*auto, memory, stream.*'disk'"):
        prepare_split(dataset, cache_root=tmp_path / "cache", loader="disk", **SPLIT)
    with pytest.raises(DatasetError, match="data.loader.*cache"):
        prepare_split(dataset, loader="stream", **SPLIT)
    with pytest.raises(ValueError, match="buffer_rows"):
        StreamedPool(tmp_path, (), (8, 8), buffer_rows=0)


def test_pad_sample_centres_with_the_channel_minimum():
    image = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    padded = pad_sample(image, (4, 5))
    assert padded.shape == (2, 4, 5)
    np.testing.assert_array_equal(padded[:, 1:3, 1:4], image)
    assert padded[0, 0, 0] == 0.0 and padded[1, 0, 0] == 6.0
    with pytest.raises(ValueError, match="larger than the training shape"):
        pad_sample(image, (1, 3))


def test_training_loop_streams_and_resumes_exactly(tiny_config, tmp_path):
    from semiseg.train.loop import run_training
    from semiseg.train.session import LocalSession

    config = {**tiny_config, "method.name": "mean_teacher", "data.loader": "stream", "data.stream_buffer_rows": 6}
    memory = LocalSession()
    run_training({**config, "data.loader": "memory"}, memory)
    streamed, again = LocalSession(), LocalSession()
    run_training(config, streamed)
    run_training(config, again)
    assert [r["train/loss"] for r in streamed.reports] == [r["train/loss"] for r in again.reports]
    assert [r["epoch"] for r in streamed.reports] == [1.0, 2.0]
    assert streamed.reports[-1]["val/dice"] == pytest.approx(again.reports[-1]["val/dice"])
    assert 0.0 <= streamed.reports[-1]["test/dice"] <= 1.0
    assert streamed.reports[0]["train/loss"] != memory.reports[0]["train/loss"], "the stream drew other batches"


def test_3d_patches_are_cut_from_streamed_volumes(dataset, tmp_path):
    split = {**SPLIT, "dims": 3}
    data = prepare_split(dataset, cache_root=tmp_path / "cache", loader="stream", stream_buffer_rows=3, **split)
    assert data.unlabelled_stream.sample_shape == (8, 8, max(DEPTHS)), "volumes padded to the largest"
    sampler = MixedBatchSampler(data.labelled_images, data.labelled_labels, data.unlabelled_images, 1, 2,
                                patch_size=(4, 4, 2), unlabelled_stream=data.unlabelled_stream)
    (batch,) = list(sampler.epoch(0, steps=1))
    assert batch["image_u"].shape == (2, 1, 4, 4, 2) and batch["image_l"].shape == (1, 1, 4, 4, 2)
    assert sampler._pool.peak_rows == 3
