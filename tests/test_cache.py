"""Tests of the Parquet cache: build once, reuse, atomicity, keys, per-rank and per-case reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from semiseg.data import DatasetError, DatasetLayout, load_case, read_layout, write_case, write_dataset_json
from semiseg.data import cache as cache_module
from semiseg.data.cache import CachedDataset, build_cache, cache_key, find_cache, printed_progress
from semiseg.data.preprocess import PreprocessSettings, preprocess_case
from semiseg.data.prepared import prepare_split

SPACING = (1.0, 1.0, 3.0)
SETTINGS = PreprocessSettings(target_spacing=(2.0, 2.0, 3.0))
DEPTHS = (5, 3, 4, 6, 2, 3)


def _case(seed: int, depth: int, width: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 15.0, size=(2, width, 10, depth)).astype(np.float32)
    label = (rng.random((width, 10, depth)) > 0.6).astype(np.int16)
    return image, label


@pytest.fixture()
def dataset(tmp_path: Path) -> DatasetLayout:
    """Four labelled and two unlabelled two-channel cases of different depths; one oblique."""
    root = tmp_path / "Dataset003_Cache"
    write_dataset_json(root, "Cache", {"0": "T1", "1": "T2"}, {"background": 0, "fg": 1}, num_training=4)
    oblique = np.eye(4)
    oblique[:3, :3] = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) @ np.diag(SPACING)
    for k, depth in enumerate(DEPTHS):
        image, label = _case(k, depth)
        write_case(root, f"case_{k}", image, label if k < 4 else None, SPACING,
                   affine=oblique if k == 1 else None)
    return read_layout(root)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def _shard_stats(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.stat().st_ino) for p in path.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- build and reuse


def test_build_stores_every_case_as_preprocessed(dataset: DatasetLayout, tmp_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    info = build_cache(dataset, SETTINGS, tmp_path / "cache", progress=lambda *a: calls.append(a),
                       rows_per_group=2, cases_per_shard=4)
    assert not info.reused and info.num_cases == 6 and info.num_rows == sum(DEPTHS)
    assert info.path.name == f"Cache-{info.key[:16]}" and info.key == cache_key(dataset, SETTINGS)
    assert sorted(p.name for p in (info.path / "shards").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert calls == [(k + 1, 6, f"case_{k}") for k in range(6)]
    cached = CachedDataset(info.path)
    assert cached.labelled_ids == ("case_0", "case_1", "case_2", "case_3")
    assert cached.unlabelled_ids == ("case_4", "case_5")
    assert cached.settings == SETTINGS
    for case_id, got in zip(cached.case_ids, cached.read_cases(cached.case_ids)):
        want = preprocess_case(load_case(dataset.get_case(case_id), dataset.class_ids), SETTINGS)
        np.testing.assert_array_equal(got.image, want.image)
        if want.label is None:
            assert got.label is None
        else:
            np.testing.assert_array_equal(got.label, want.label)
        assert got.spacing == pytest.approx(want.spacing) and got.original_shape == want.original_shape
        np.testing.assert_allclose(got.intensity_range, want.intensity_range)
    assert cached.read_cases(["case_1"])[0].image.shape == (2, 5, 6, 3), "the rotated case is reoriented to RAS"
    entry = cached.case_entry("case_0")
    assert entry["label_counts"] == {str(v): int(n) for v, n in
                                     zip(*np.unique(cached.read_cases(["case_0"])[0].label, return_counts=True))}


def test_second_build_reuses_without_rewriting(dataset: DatasetLayout, tmp_path: Path) -> None:
    first = build_cache(dataset, SETTINGS, tmp_path / "cache")
    before = _shard_stats(first.path)
    folder_inode = first.path.stat().st_ino
    second = build_cache(read_layout(dataset.root), SETTINGS, tmp_path / "cache")
    assert second.reused and second.path == first.path and second.key == first.key
    assert _shard_stats(second.path) == before and second.path.stat().st_ino == folder_inode
    assert find_cache(dataset, SETTINGS, tmp_path / "cache") == second


def test_changed_setting_gives_a_new_key(dataset: DatasetLayout, tmp_path: Path) -> None:
    base = build_cache(dataset, SETTINGS, tmp_path / "cache")
    keys = {base.key}
    for settings in (PreprocessSettings(target_spacing=(2.0, 2.0, 6.0)), PreprocessSettings(),
                     PreprocessSettings(target_spacing=(2.0, 2.0, 3.0), normalisation="zscore_nonzero"),
                     PreprocessSettings(target_spacing=(2.0, 2.0, 3.0), dims=3)):
        keys.add(cache_key(dataset, settings))
    assert len(keys) == 5
    other = build_cache(dataset, PreprocessSettings(target_spacing=(2.0, 2.0, 3.0), image_order=3),
                        tmp_path / "cache")
    assert not other.reused and other.path != base.path
    assert _listing(tmp_path / "cache") == sorted([base.path.name, other.path.name])


def test_changed_input_file_gives_a_new_key(dataset: DatasetLayout, tmp_path: Path) -> None:
    base = build_cache(dataset, SETTINGS, tmp_path / "cache")
    image, label = _case(2, DEPTHS[2])
    label[0, 0, 0] = 1 - label[0, 0, 0]
    stat = dataset.get_case("case_2").label_path.stat()
    write_case(dataset.root, "case_2", image, label, SPACING)
    os.utime(dataset.get_case("case_2").label_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert find_cache(dataset, SETTINGS, tmp_path / "cache") is None, "content change with the old mtime"
    rebuilt = build_cache(read_layout(dataset.root), SETTINGS, tmp_path / "cache")
    assert not rebuilt.reused and rebuilt.key != base.key


def test_added_unlabelled_case_gives_a_new_key(dataset: DatasetLayout) -> None:
    before = cache_key(dataset, SETTINGS)
    write_case(dataset.root, "case_9", _case(9, 2)[0], None, SPACING)
    assert cache_key(read_layout(dataset.root), SETTINGS) != before


def test_interrupted_build_leaves_nothing(dataset: DatasetLayout, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Path] = []
    real_open = cache_module._open_shard

    def failing_open(path: Path):
        opened.append(path)
        if len(opened) == 2:
            raise OSError("disk full (simulated) after the first shard")
        return real_open(path)

    monkeypatch.setattr(cache_module, "_open_shard", failing_open)
    root = tmp_path / "cache"
    with pytest.raises(OSError, match="simulated"):
        build_cache(dataset, SETTINGS, root, cases_per_shard=2)
    assert opened[0].is_relative_to(root) and opened[0].name == "part-00000.parquet"
    assert _listing(root) == [], "neither a partial cache nor a temporary folder is left"
    assert find_cache(dataset, SETTINGS, root) is None
    monkeypatch.setattr(cache_module, "_open_shard", real_open)
    info = build_cache(dataset, SETTINGS, root, cases_per_shard=2)
    assert not info.reused and CachedDataset(info.path).num_rows() == sum(DEPTHS)


def test_bad_case_fails_the_build_naming_every_file(dataset: DatasetLayout, tmp_path: Path) -> None:
    const = dataset.get_case("case_4").image_paths[1]
    write_case(dataset.root, "case_4", np.stack([_case(4, DEPTHS[4])[0][0], np.full((12, 10, 2), 7.0)]),
               None, SPACING)
    label = dataset.get_case("case_5")
    write_case(dataset.root, "case_5", _case(5, DEPTHS[5])[0], np.full((12, 10, 3), 3, np.int16), SPACING)
    with pytest.raises(DatasetError) as err:
        build_cache(read_layout(dataset.root), SETTINGS, tmp_path / "cache")
    paths = [path for path, _ in err.value.problems]
    assert paths == [str(const), str(label.image_paths[0].parent.parent / "labelsTr" / "case_5.nii.gz")]
    assert "constant image" in str(err.value) and "label values [3] are not declared" in str(err.value)
    assert _listing(tmp_path / "cache") == []


def test_printed_progress_prints_every_n_cases(capsys: pytest.CaptureFixture[str]) -> None:
    report = printed_progress(every=2)
    for done in range(1, 6):
        report(done, 5, f"c{done}")
    assert capsys.readouterr().err.splitlines() == [
        "prepared 2/5 cases (last: c2)", "prepared 4/5 cases (last: c4)", "prepared 5/5 cases (last: c5)"]


# --------------------------------------------------------------------------- reading


def test_ranks_read_disjoint_rows_whose_union_is_everything(dataset: DatasetLayout, tmp_path: Path) -> None:
    info = build_cache(dataset, SETTINGS, tmp_path / "cache", rows_per_group=2, cases_per_shard=3)
    seen = []
    for rank in range(2):
        reader = CachedDataset(info.path)
        batches = list(reader.iter_slices(rank=rank, world_size=2, batch_rows=3))
        rows = [(row.case_id, row.slice_index) for batch in batches for row in batch]
        assert all(len(batch) <= 3 for batch in batches)
        assert reader.rows_read == len(rows) < info.num_rows, "a rank reads only its own row groups"
        seen.append(set(rows))
        assert len(rows) == len(set(rows))
    assert not seen[0] & seen[1]
    everything = {(cid, z) for cid, depth in zip(CachedDataset(info.path).case_ids, DEPTHS) for z in range(depth)}
    assert seen[0] | seen[1] == everything
    assert abs(len(seen[0]) - len(seen[1])) <= 2, "ranks are balanced up to one row group"


def test_streamed_rows_match_whole_cases(dataset: DatasetLayout, tmp_path: Path) -> None:
    info = build_cache(dataset, SETTINGS, tmp_path / "cache")
    reader = CachedDataset(info.path)
    whole = reader.read_cases(["case_3", "case_5"])
    rows = [row for batch in reader.iter_slices(["case_3", "case_5"], batch_rows=4) for row in batch]
    assert [r.case_id for r in rows] == ["case_3"] * DEPTHS[3] + ["case_5"] * DEPTHS[5]
    for row in rows:
        case = whole[0] if row.case_id == "case_3" else whole[1]
        np.testing.assert_array_equal(row.image, case.image[..., row.slice_index])
        assert (row.label is None) == (case.label is None)
        assert row.spacing == pytest.approx((2.0, 2.0, 3.0))


def test_case_filter_reads_only_the_requested_cases(dataset: DatasetLayout, tmp_path: Path) -> None:
    info = build_cache(dataset, SETTINGS, tmp_path / "cache", rows_per_group=2, cases_per_shard=6)
    reader = CachedDataset(info.path)
    [case] = reader.read_cases(["case_3"])
    assert case.case_id == "case_3" and case.image.shape[-1] == DEPTHS[3]
    assert reader.rows_read == reader.num_rows(["case_3"]) == DEPTHS[3] < info.num_rows
    streamed = sum(len(batch) for batch in reader.iter_slices(["case_0", "case_4"]))
    assert streamed == DEPTHS[0] + DEPTHS[4] and reader.rows_read == DEPTHS[3] + streamed
    with pytest.raises(KeyError, match="case_77"):
        reader.read_cases(["case_77"])


def test_volume_rows_for_three_dimensional_settings(dataset: DatasetLayout, tmp_path: Path) -> None:
    settings = PreprocessSettings(target_spacing=(2.0, 2.0, 3.0), dims=3)
    info = build_cache(dataset, settings, tmp_path / "cache")
    reader = CachedDataset(info.path)
    assert info.num_rows == 6
    rows = [row for batch in reader.iter_slices(rank=1, world_size=2) for row in batch]
    assert [row.case_id for row in rows] == ["case_1", "case_3", "case_5"]
    assert rows[0].slice_index is None and rows[0].image.ndim == 4
    np.testing.assert_array_equal(rows[1].image, reader.read_cases(["case_3"])[0].image)


def test_reader_rejects_bad_arguments_and_folders(dataset: DatasetLayout, tmp_path: Path) -> None:
    info = build_cache(dataset, SETTINGS, tmp_path / "cache")
    reader = CachedDataset(info.path)
    with pytest.raises(ValueError, match="rank"):
        next(reader.iter_slices(rank=2, world_size=2))
    with pytest.raises(DatasetError, match="not a complete semiseg cache"):
        CachedDataset(tmp_path)
    manifest = json.loads((info.path / "manifest.json").read_text())
    manifest["format"] = 0
    (info.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="rebuild it"):
        CachedDataset(info.path)
    assert find_cache(dataset, SETTINGS, tmp_path / "cache") is None


# --------------------------------------------------------------------------- prepare_split through the cache


def test_prepare_split_through_the_cache_matches_in_memory(dataset: DatasetLayout, tmp_path: Path) -> None:
    kwargs = {"num_labelled": 2, "num_validation": 1, "num_test": 1, "split_seed": 3, "dims": 2}
    in_memory = prepare_split(dataset, settings=SETTINGS, **kwargs)
    cached = prepare_split(dataset, settings=SETTINGS, cache_root=tmp_path / "cache", **kwargs)
    again = prepare_split(dataset, settings=SETTINGS, cache_root=tmp_path / "cache", **kwargs)
    assert len(_listing(tmp_path / "cache")) == 1
    for data in (cached, again):
        assert data.split == in_memory.split
        np.testing.assert_array_equal(data.labelled_images, in_memory.labelled_images)
        np.testing.assert_array_equal(data.labelled_labels, in_memory.labelled_labels)
        np.testing.assert_array_equal(data.unlabelled_images, in_memory.unlabelled_images)
        for got, want in zip(data.validation + data.test, in_memory.validation + in_memory.test):
            assert got.case_id == want.case_id and got.spacing == pytest.approx((2.0, 2.0, 3.0))
            np.testing.assert_array_equal(got.image, want.image)
            np.testing.assert_array_equal(got.label, want.label)
    n_labelled = sum(DEPTHS[int(c[-1])] for c in in_memory.split.labelled)
    assert in_memory.labelled_images.shape == (n_labelled, 2, 6, 6), "6x5 slices and case_1's 5x6 ones"
    assert in_memory.labelled_labels.dtype == np.int64


def test_prepare_split_pads_training_samples_to_the_largest_shape(dataset: DatasetLayout) -> None:
    write_case(dataset.root, "case_6", _case(6, 3, width=16)[0], None, SPACING)
    layout = read_layout(dataset.root)
    data = prepare_split(layout, num_labelled=4, num_validation=0, num_test=0, split_seed=0, dims=2)
    assert data.labelled_images.shape[2:] == data.unlabelled_images.shape[2:] == (16, 12), "case_1 is 10x12"
    assert data.labelled_labels.shape[1:] == (16, 12)
    assert (data.labelled_labels[:, :2] == 0).all() and (data.labelled_labels[:, -2:] == 0).all()
    first_case = data.labelled_images[:DEPTHS[0]]
    for channel in range(2):
        assert first_case[:, channel, :2].max() == first_case[:, channel].min(), "images pad with the background"
    volumes = prepare_split(layout, num_labelled=4, num_validation=0, num_test=0, split_seed=0, dims=3)
    assert volumes.labelled_images.shape == (4, 2, 16, 12, 6)
    assert volumes.unlabelled_images.shape == (3, 2, 16, 12, 6)
