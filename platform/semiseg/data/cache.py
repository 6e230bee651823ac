"""A Parquet cache of preprocessed cases, built once per (dataset contents, settings).

Folder of one cache (``CACHE_ROOT/{name}-{key[:16]}``)::

    manifest.json                  key, settings, labels, per case: shard, row groups,
                                   shape, spacing, label voxel counts, raw intensity range
    shards/part-00000.parquet      one row per axial slice (dims 2) or per volume (dims 3)

Row columns: ``case_id``, ``slice_index`` (null for volume rows), ``spacing``,
``shape`` (spatial shape of the row), ``channels``, ``image`` (float32 bytes,
C order ``[C, *shape]``) and ``label`` (int16 bytes, null when unlabelled).
Rows hold no role: splits are made later, by case id. Each row group holds rows
of one case only, so readers fetch exactly the cases (and ranks exactly the row
groups) they need.

**Cache key.** SHA-256 of a JSON document holding the cache format version,
the :class:`PreprocessSettings`, the declared labels and channels, and per
training case its id, label presence and, for every input file, its name, size,
modification time (ns) and the SHA-256 of its first and last 8 KiB. The tail
of a ``.nii.gz`` file is gzip's CRC-32 and length of the whole content, so a
content change is caught without reading whole files; a touched file (new
mtime) also gives a new key. Moving a dataset keeps the key when mtimes are kept.

**Atomicity.** A build writes into a hidden ``.tmp-*`` folder next to the
cache, writes ``manifest.json`` last, and renames the folder into place; on any
error the temporary folder is removed. Builders of the same key take turns
through a lock file (``.{folder}.lock``, left in place), so concurrent trials
build once and the others reuse it. Only a build killed outright (SIGKILL,
power loss) can leave a ``.tmp-*`` folder; it is never taken for a cache and
can be deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semiseg.data.errors import DatasetError
from semiseg.data.dataset import CaseFiles, DatasetLayout
from semiseg.data.nifti import max_voxels
from semiseg.data.preprocess import PreprocessedCase, PreprocessSettings, preprocess_case
from semiseg.data.validation import load_case

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
FINGERPRINT_BYTES = 8 * 1024
SCHEMA = pa.schema([
    ("case_id", pa.string()),
    ("slice_index", pa.int32()),
    ("spacing", pa.list_(pa.float64(), 3)),
    ("shape", pa.list_(pa.int32())),
    ("channels", pa.int16()),
    ("image", pa.large_binary()),
    ("label", pa.large_binary()),
])

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class CacheInfo:
    """Where a built cache lies.

    Attributes:
        path: The cache folder (holding ``manifest.json`` and ``shards/``).
        key: The full cache key (hex SHA-256).
        reused: True when an existing cache was found, False when just built.
        num_cases: Cases stored.
        num_rows: Rows stored (slices for dims 2, volumes for dims 3).
    """

    path: Path
    key: str
    reused: bool
    num_cases: int
    num_rows: int


@dataclass(frozen=True)
class CachedRow:
    """One stored row: an axial slice (dims 2) or a whole volume (dims 3).

    Attributes:
        case_id: The case it belongs to.
        slice_index: Index along Z, or None for a volume row.
        image: float32 ``[C, X, Y]`` (slice) or ``[C, X, Y, Z]`` (volume).
        label: int16 ``[X, Y]`` or ``[X, Y, Z]``, or None when unlabelled.
        spacing: The case's voxel size in mm.
    """

    case_id: str
    slice_index: int | None
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]


# --------------------------------------------------------------------------- key


def file_fingerprint(path: Path) -> list[Any]:
    """Cheap identity of a file's contents: name, size, mtime and a hash of its ends.

    Args:
        path: The file.

    Returns:
        ``[name, size, mtime_ns, sha256(first 8 KiB + last 8 KiB)]``.

    Raises:
        DatasetError: When the file cannot be read.
    """
    try:
        stat = path.stat()
        with path.open("rb") as handle:
            digest = hashlib.sha256(handle.read(FINGERPRINT_BYTES))
            handle.seek(max(0, stat.st_size - FINGERPRINT_BYTES))
            digest.update(handle.read(FINGERPRINT_BYTES))
    except OSError as exc:
        raise DatasetError.single(path, f"cannot read input file: {exc}") from None
    return [path.name, stat.st_size, stat.st_mtime_ns, digest.hexdigest()]


def cache_key(layout: DatasetLayout, settings: PreprocessSettings) -> str:
    """The key of a dataset's cache under some settings (see the module doc).

    Args:
        layout: The dataset; its training cases (labelled and unlabelled) are cached.
        settings: The preprocessing settings.

    Returns:
        A 64-character hex SHA-256.

    Raises:
        DatasetError: When an input file cannot be read.
    """
    payload = {
        "format": CACHE_FORMAT,
        "settings": settings.to_dict(),
        "labels": layout.labels,
        "channels": layout.channel_names,
        "cases": [_case_fingerprint(case) for case in layout.training],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _case_fingerprint(case: CaseFiles) -> list[Any]:
    label = None if case.label_path is None else file_fingerprint(case.label_path)
    return [case.case_id, case.packed_channels, [file_fingerprint(p) for p in case.image_paths], label]


def cache_folder(layout: DatasetLayout, key: str, cache_root: Path) -> Path:
    """The folder a cache of ``layout`` with ``key`` lives in.

    Args:
        layout: The dataset (its name makes the folder readable).
        key: The cache key.
        cache_root: The folder holding all caches.

    Returns:
        ``cache_root / f"{name}-{key[:16]}"``.
    """
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", layout.name).strip("._") or "dataset"
    return Path(cache_root) / f"{slug}-{key[:16]}"


# --------------------------------------------------------------------------- build


def find_cache(layout: DatasetLayout, settings: PreprocessSettings, cache_root: Path) -> CacheInfo | None:
    """Look a complete cache up without building one.

    Args:
        layout: The dataset.
        settings: The preprocessing settings.
        cache_root: The folder holding all caches.

    Returns:
        The cache, or None when no complete cache has this key.

    Raises:
        DatasetError: When an input file cannot be read.
    """
    key = cache_key(layout, settings)
    return _complete(cache_folder(layout, key, cache_root), key)


def build_cache(
    layout: DatasetLayout,
    settings: PreprocessSettings,
    cache_root: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    rows_per_group: int = 16,
    cases_per_shard: int = 32,
) -> CacheInfo:
    """Preprocess every training case into a Parquet cache, or reuse the existing one.

    Cases are loaded, checked (as :func:`~semiseg.data.validation.validate_layout`
    does), preprocessed and written one at a time, so memory holds one case.

    Args:
        layout: The dataset (e.g. from :func:`semiseg.data.formats.read_dataset`).
        settings: The preprocessing settings.
        cache_root: The folder holding all caches (created if missing).
        progress: Called as ``progress(done, total, case_id)`` after each case.
        rows_per_group: Rows per Parquet row group (the unit a rank reads).
        cases_per_shard: Cases per Parquet file.

    Returns:
        The cache; ``reused`` tells whether it already existed.

    Raises:
        DatasetError: Listing every problem of every case (unreadable, mismatched
            or constant files, undeclared labels, ...); nothing is left behind.
    """
    cache_root = Path(cache_root)
    key = cache_key(layout, settings)
    final = cache_folder(layout, key, cache_root)
    found = _complete(final, key)
    if found is not None:
        return found
    cache_root.mkdir(parents=True, exist_ok=True)
    with _lock(cache_root / f".{final.name}.lock"):
        found = _complete(final, key)
        if found is not None:
            return found
        if final.exists():
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_root))
        try:
            tmp.chmod(0o755)
            manifest = _write_cache(layout, settings, key, tmp, progress, rows_per_group, cases_per_shard)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return CacheInfo(final, key, False, len(manifest["cases"]), manifest["num_rows"])


def printed_progress(every: int = 10, stream: TextIO | None = None) -> Progress:
    """A progress callback printing one line every ``every`` cases (and at the end).

    Args:
        every: Cases between lines.
        stream: Where to print; standard error by default.

    Returns:
        A callback for :func:`build_cache`.
    """
    def report(done: int, total: int, case_id: str) -> None:
        if done % max(1, every) == 0 or done == total:
            print(f"prepared {done}/{total} cases (last: {case_id})", file=stream or sys.stderr, flush=True)

    return report


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _complete(folder: Path, key: str) -> CacheInfo | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("format") != CACHE_FORMAT or manifest.get("key") != key:
        return None
    return CacheInfo(folder, key, True, len(manifest["cases"]), int(manifest["num_rows"]))


def _open_shard(path: Path) -> pq.ParquetWriter:
    """Open one Parquet shard for writing (statistics only on the small columns)."""
    return pq.ParquetWriter(path, SCHEMA, compression="zstd", use_dictionary=["case_id"],
                            write_statistics=["case_id", "slice_index"])


def _write_cache(
    layout: DatasetLayout,
    settings: PreprocessSettings,
    key: str,
    folder: Path,
    progress: Progress | None,
    rows_per_group: int,
    cases_per_shard: int,
) -> dict[str, Any]:
    (folder / "shards").mkdir()
    max_voxels()  # a malformed $SEMISEG_MAX_VOXELS is reported once, not once per case
    problems: list[tuple[str, str]] = []
    entries: list[dict[str, Any]] = []
    writer: pq.ParquetWriter | None = None
    shard_cases: list[dict[str, Any]] = []
    total = len(layout.training)
    try:
        for done, case in enumerate(layout.training, start=1):
            processed = _preprocess(case, layout, settings, problems)
            if processed is not None:
                if writer is None:
                    shard = f"shards/part-{len(entries) // max(1, cases_per_shard):05d}.parquet"
                    writer = _open_shard(folder / shard)
                writer.write_table(_rows(processed, settings.dims), row_group_size=max(1, rows_per_group))
                shard_cases.append(_entry(processed, shard))
                entries.append(shard_cases[-1])
                if len(shard_cases) == cases_per_shard:
                    writer.close()
                    writer = None
                    _index_row_groups(folder, shard_cases)
                    shard_cases = []
            if progress is not None:
                progress(done, total, case.case_id)
        if writer is not None:
            writer.close()
            writer = None
            _index_row_groups(folder, shard_cases)
    finally:
        if writer is not None:
            writer.close()
    if problems:
        raise DatasetError(problems)
    manifest = {
        "format": CACHE_FORMAT, "key": key, "name": layout.name, "layout_format": layout.layout_format,
        "root": str(layout.root), "settings": settings.to_dict(), "labels": layout.labels,
        "channel_names": layout.channel_names, "num_test_images": len(layout.test),
        "num_rows": sum(entry["rows"] for entry in entries), "cases": entries,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def absent_label_problem(manifest: Mapping[str, Any]) -> tuple[str, str] | None:
    """Labels declared in ``dataset.json`` that no labelled case of a built cache holds.

    Uses the label voxel counts the manifest records per case, so no label file
    is read again. They are counted after preprocessing: a label that resampling
    or ``crop_to_body`` removed everywhere is absent from training just the same.

    Args:
        manifest: A cache's manifest (:attr:`CachedDataset.manifest`).

    Returns:
        ``(dataset.json path, message)`` naming the absent labels and the number of
        label files scanned, or None when every declared label occurs somewhere.
    """
    labelled = [entry for entry in manifest["cases"] if entry["labelled"]]
    present = {int(value) for entry in labelled for value, count in entry["label_counts"].items() if count}
    absent = sorted(((value, name) for name, value in manifest["labels"].items() if int(value) not in present))
    if not absent:
        return None
    names = ", ".join(f"{name!r} ({value})" for value, name in absent)
    return (str(Path(manifest["root"]) / "dataset.json"),
            f"declared label(s) {names} occur in none of the {len(labelled)} label files scanned "
            "(voxels counted after preprocessing); a network cannot learn them and scores Dice 0 on them")


def _preprocess(
    case: CaseFiles, layout: DatasetLayout, settings: PreprocessSettings, problems: list[tuple[str, str]]
) -> PreprocessedCase | None:
    """Load (checking) and preprocess a case; once a problem is known, only check the rest."""
    try:
        loaded = load_case(case, layout.class_ids, check_constant=True)
        return None if problems else preprocess_case(loaded, settings)
    except DatasetError as error:
        problems.extend(error.problems)
    except ValueError as error:
        problems.append((str(case.image_paths[0]), f"cannot preprocess case {case.case_id!r}: {error}"))
    return None


def _rows(case: PreprocessedCase, dims: int) -> pa.Table:
    image, label = case.image, case.label
    if dims == 3:
        images = [image.tobytes()]
        labels = [None if label is None else label.tobytes()]
        slices: list[int | None] = [None]
        shape = list(image.shape[1:])
    else:
        depth = image.shape[3]
        images = [np.ascontiguousarray(image[..., z]).tobytes() for z in range(depth)]
        labels = [None if label is None else np.ascontiguousarray(label[..., z]).tobytes() for z in range(depth)]
        slices = list(range(depth))
        shape = list(image.shape[1:3])
    count = len(images)
    return pa.table({
        "case_id": pa.array([case.case_id] * count, pa.string()),
        "slice_index": pa.array(slices, pa.int32()),
        "spacing": pa.array([list(case.spacing)] * count, pa.list_(pa.float64(), 3)),
        "shape": pa.array([shape] * count, pa.list_(pa.int32())),
        "channels": pa.array([image.shape[0]] * count, pa.int16()),
        "image": pa.array(images, pa.large_binary()),
        "label": pa.array(labels, pa.large_binary()),
    }, schema=SCHEMA)


def _entry(case: PreprocessedCase, shard: str) -> dict[str, Any]:
    counts: dict[str, int] = {}
    if case.label is not None:
        values, numbers = np.unique(case.label, return_counts=True)
        counts = {str(int(v)): int(n) for v, n in zip(values, numbers)}
    return {
        "case_id": case.case_id, "labelled": case.label is not None, "shard": shard,
        "shape": list(case.image.shape[1:]), "channels": int(case.image.shape[0]),
        "spacing": list(case.spacing), "original_shape": list(case.original_shape),
        "original_spacing": list(case.original_spacing),
        "crop_box": None if case.crop_box is None else [list(b) for b in case.crop_box],
        "intensity_range": [list(r) for r in case.intensity_range], "label_counts": counts,
        "row_groups": [], "rows": 0,
    }


def _index_row_groups(folder: Path, entries: list[dict[str, Any]]) -> None:
    """Record which row groups of the shard hold each case, from the written file itself."""
    by_id = {entry["case_id"]: entry for entry in entries}
    shard = pq.ParquetFile(folder / entries[0]["shard"])
    for group in range(shard.metadata.num_row_groups):
        ids = shard.read_row_group(group, columns=["case_id"]).column("case_id").unique().to_pylist()
        if len(ids) != 1:
            raise RuntimeError(f"row group {group} of {entries[0]['shard']} mixes cases {ids}")
        by_id[ids[0]]["row_groups"].append(group)
        by_id[ids[0]]["rows"] += shard.metadata.row_group(group).num_rows


# --------------------------------------------------------------------------- read


class CachedDataset:
    """Read access to a built cache: whole cases by id, or streamed rows per rank.

    Nothing is loaded up front but ``manifest.json``; every read fetches only
    the row groups of the requested cases (see :attr:`rows_read`).

    Attributes:
        path: The cache folder.
        manifest: The parsed ``manifest.json``.
        rows_read: Rows fetched from Parquet so far by this object (for checks).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open a cache folder.

        Args:
            path: A folder made by :func:`build_cache` (``CacheInfo.path``).

        Raises:
            DatasetError: When it holds no readable manifest of this cache format.
        """
        self.path = Path(path)
        try:
            self.manifest: dict[str, Any] = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DatasetError.single(self.path / MANIFEST, f"not a complete semiseg cache: {exc}") from None
        if self.manifest.get("format") != CACHE_FORMAT:
            raise DatasetError.single(self.path / MANIFEST, f"cache format {self.manifest.get('format')!r} "
                                      f"is not {CACHE_FORMAT}; rebuild it")
        self._cases = {entry["case_id"]: entry for entry in self.manifest["cases"]}
        self.rows_read = 0

    @property
    def settings(self) -> PreprocessSettings:
        """The preprocessing settings the cache was built with."""
        return PreprocessSettings.from_dict(self.manifest["settings"])

    @property
    def class_ids(self) -> tuple[int, ...]:
        """Declared label values, sorted (background included), as :attr:`DatasetLayout.class_ids`."""
        return tuple(sorted(int(value) for value in self.manifest["labels"].values()))

    @property
    def num_channels(self) -> int:
        """Image channels per case, as :attr:`DatasetLayout.num_channels`."""
        return len(self.manifest["channel_names"])

    @property
    def case_ids(self) -> tuple[str, ...]:
        """Every stored case, sorted by id."""
        return tuple(self._cases)

    @property
    def labelled_ids(self) -> tuple[str, ...]:
        """Stored cases that have a label."""
        return tuple(cid for cid, entry in self._cases.items() if entry["labelled"])

    @property
    def unlabelled_ids(self) -> tuple[str, ...]:
        """Stored cases without a label."""
        return tuple(cid for cid, entry in self._cases.items() if not entry["labelled"])

    def case_entry(self, case_id: str) -> dict[str, Any]:
        """The manifest entry of one case (shape, spacing, label counts, ...).

        Args:
            case_id: The case identifier.

        Returns:
            The entry.

        Raises:
            KeyError: When the cache holds no such case.
        """
        if case_id not in self._cases:
            raise KeyError(f"case {case_id!r} is not in the cache {self.path}")
        return self._cases[case_id]

    def num_rows(self, case_ids: Iterable[str] | None = None) -> int:
        """Rows stored for some cases.

        Args:
            case_ids: The cases; all when None.

        Returns:
            Their row count (slices for dims 2, one per case for dims 3).
        """
        ids = self.case_ids if case_ids is None else case_ids
        return sum(self.case_entry(cid)["rows"] for cid in ids)

    def read_cases(self, case_ids: Sequence[str]) -> list[PreprocessedCase]:
        """Read whole cases, fetching only their row groups.

        Args:
            case_ids: The cases, in the order wanted.

        Returns:
            One preprocessed case per id (``image [C, X, Y, Z]``, ``label [X, Y, Z]``
            or None), with the metadata recorded at build time.

        Raises:
            KeyError: For an id the cache does not hold.
        """
        cases = []
        for case_id in case_ids:
            entry = self.case_entry(case_id)
            shard = pq.ParquetFile(self.path / entry["shard"])
            rows: list[CachedRow] = []
            for group in entry["row_groups"]:
                rows.extend(self._decode(shard.read_row_group(group)))
            cases.append(self._assemble(entry, rows))
        return cases

    def iter_slices(
        self, case_ids: Iterable[str] | None = None, rank: int = 0, world_size: int = 1, batch_rows: int = 64
    ) -> Iterator[list[CachedRow]]:
        """Stream this rank's rows of some cases, a batch at a time.

        The row groups of the selected cases, in the order of ``case_ids``, are
        dealt round-robin to the ranks, so ranks read disjoint rows whose union
        is every selected row, and no rank reads another rank's row groups.
        Rank sizes differ by at most one row group (``rows_per_group`` rows at
        build time); a rank beyond the number of row groups gets none.

        Args:
            case_ids: The cases; all when None.
            rank: This worker's rank, ``0 <= rank < world_size``.
            world_size: Number of workers.
            batch_rows: Most rows per yielded batch.

        Yields:
            Lists of at most ``batch_rows`` rows.

        Raises:
            ValueError: On a bad rank, world size or batch size.
            KeyError: For an id the cache does not hold.
        """
        if world_size < 1 or not 0 <= rank < world_size or batch_rows < 1:
            raise ValueError(f"need 0 <= rank < world_size and batch_rows >= 1, got rank {rank}, "
                             f"world_size {world_size}, batch_rows {batch_rows}")
        ids = self.case_ids if case_ids is None else tuple(case_ids)
        groups = [(self.case_entry(cid)["shard"], g) for cid in ids for g in self.case_entry(cid)["row_groups"]]
        mine = groups[rank::world_size]
        start = 0
        while start < len(mine):
            shard = mine[start][0]
            stop = start
            while stop < len(mine) and mine[stop][0] == shard:
                stop += 1
            parquet = pq.ParquetFile(self.path / shard)
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[g for _, g in mine[start:stop]]):
                yield self._decode(pa.Table.from_batches([batch]))
            start = stop

    def _decode(self, table: pa.Table) -> list[CachedRow]:
        self.rows_read += table.num_rows
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        rows = []
        for k in range(table.num_rows):
            shape = (int(columns["channels"][k]), *columns["shape"][k])
            image = np.frombuffer(columns["image"][k], np.float32).reshape(shape).copy()
            raw_label = columns["label"][k]
            label = None if raw_label is None else np.frombuffer(raw_label, np.int16).reshape(shape[1:]).copy()
            spacing = tuple(float(s) for s in columns["spacing"][k])
            rows.append(CachedRow(columns["case_id"][k], columns["slice_index"][k], image, label,
                                  (spacing[0], spacing[1], spacing[2])))
        return rows

    def _assemble(self, entry: dict[str, Any], rows: list[CachedRow]) -> PreprocessedCase:
        if len(rows) != entry["rows"]:
            raise DatasetError.single(self.path / entry["shard"], f"case {entry['case_id']!r} has {len(rows)} "
                                      f"rows in the cache, the manifest says {entry['rows']}; rebuild it")
        if rows[0].slice_index is None:
            image, label = rows[0].image, rows[0].label
        else:
            rows = sorted(rows, key=lambda row: row.slice_index or 0)
            image = np.stack([row.image for row in rows], axis=-1)
            label = None if rows[0].label is None else np.stack([row.label for row in rows], axis=-1)
        box = entry["crop_box"]
        return PreprocessedCase(
            case_id=entry["case_id"], image=image, label=label, spacing=_triple(entry["spacing"]),
            original_shape=_triple(entry["original_shape"], int),
            original_spacing=_triple(entry["original_spacing"]),
            crop_box=None if box is None else (_pair(box[0]), _pair(box[1]), _pair(box[2])),
            intensity_range=tuple((float(lo), float(hi)) for lo, hi in entry["intensity_range"]),
        )


def _triple(values: Sequence[Any], kind: Callable[[Any], Any] = float) -> Any:
    return (kind(values[0]), kind(values[1]), kind(values[2]))


def _pair(values: Sequence[Any]) -> tuple[int, int]:
    return (int(values[0]), int(values[1]))
