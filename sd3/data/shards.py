"""Parquet shards: their schema, atomic writing, and reading rows by global row id (ARCHITECTURE §4).

A *shard folder* holds `*.parquet` files. Shards are ordered by file name and their rows numbered one after
another, so a global row id is `offset of its shard + row within the shard`. The bucket index (index.py) stores
these ids; the reader here turns them back into rows.

Two schemas:
- raw shards (`make-dataset`, `import-folder`, or any dataset with these columns): `image` (encoded bytes),
  `recaption`, `recaption_short`, optionally `height` / `width`;
- phase shards (`create-phase`): the raw columns plus `height`, `width`, `aspect_ratio` and `bucket_size`
  (`"HxW"` in pixels, height first, both multiples of the patch size).

Parquet reads whole row groups, and a loader reads a few hundred rows scattered over every shard per step, so
phase shards use row groups of about PHASE_ROW_GROUP_BYTES of images (a random row costs one such read) rather
than parquet's default of a million rows. Only caption columns are compressed: image bytes are already
compressed, and a compressed chunk per small row group would cost create-indices a codec set-up per group.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sd3.errors import UserError

RAW_COLUMNS = ("image", "recaption", "recaption_short")
PHASE_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("recaption", pa.string()),
        ("recaption_short", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("aspect_ratio", pa.float32()),  # width / height of the stored image
        ("bucket_size", pa.string()),  # "HxW", height first
    ]
)
PHASE_ROW_GROUP_BYTES = 4 << 20  # image bytes per row group: ~40 rows at 256 px PNG, ~4 at 1024 px
MIN_ROW_GROUP_ROWS, MAX_ROW_GROUP_ROWS = 4, 1024
COMPRESSED_COLUMNS = ("recaption", "recaption_short")
# Open (memory-mapped) shards kept per reader; each holds a file descriptor and its parsed footer. A step reads
# rows from many shards, so too few would re-open (and re-parse) shards every step.
MAX_OPEN_FILES = 256
# Decoded row groups kept per reader, by their Arrow size. A loader that reads only captions (hybrid mode) decodes a
# whole row group's caption chunk for each row it wants: a small dataset's few row groups (the quick start's 20 of
# 1000 rows) then cost a quarter of its loader's CPU per step, and a real one's caption chunks (~40 rows each) fit
# by the ten thousand. Image row groups (~4 MB) are rarely read twice; the bound keeps what they hold small.
ROW_GROUP_CACHE_BYTES = 64 << 20


class ShardError(UserError, ValueError):
    """A shard folder or file that cannot be used; the message names the file."""


class ShardReadError(ShardError):
    """A shard whose bytes cannot be read (damaged or truncated file), as opposed to one of the wrong shape."""


def list_shards(folder: str | Path) -> list[Path]:
    """The shard files of a folder in row-id order. Hidden files (temporary outputs being written) are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"shard folder {folder} does not exist")
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))


def row_group_rows_for(table: pa.Table, target_bytes: int = PHASE_ROW_GROUP_BYTES) -> int:
    """Rows per row group so that a group holds about `target_bytes` of the `image` column."""
    if "image" not in table.column_names or table.num_rows == 0:
        return MAX_ROW_GROUP_ROWS
    mean = max(1, table.column("image").nbytes // table.num_rows)
    return int(min(MAX_ROW_GROUP_ROWS, max(MIN_ROW_GROUP_ROWS, target_bytes // mean)))


def write_table(
    path: str | Path, table: pa.Table, row_group_rows: int | None = None, metadata: dict | None = None
) -> None:
    """Write a shard atomically: to a hidden temporary name in the same folder, then rename.

    A crash never leaves a half-written shard under its final name, so "the output exists" means "it is done"
    (create-phase relies on this to resume). row_group_rows: None = row_group_rows_for(table).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    if row_group_rows is None:
        row_group_rows = row_group_rows_for(table)
    columns = table.column_names
    compression = {c: ("zstd" if c in COMPRESSED_COLUMNS else "none") for c in columns}
    dictionary = [c for c in columns if c != "image"]
    try:
        # Min/max statistics of image bytes and captions are never used and would fill every row group's footer entry.
        statistics = [c for c in columns if c != "image" and c not in COMPRESSED_COLUMNS]
        pq.write_table(
            table, tmp, row_group_size=row_group_rows, compression=compression, use_dictionary=dictionary,
            write_statistics=statistics,
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def shard_row_count(path: str | Path) -> int:
    """Rows in a shard, from its footer only."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowInvalid) as e:
        raise ShardError(f"{path}: not a readable parquet file ({e})") from None


class ShardReader:
    """Rows of a shard folder by global row id, reading only the row groups and columns asked for.

    folder: the shard folder. row_counts: rows per shard in `list_shards` order when already known (the bucket
    index manifest has them), which saves reading every footer. Files are memory-mapped and opened lazily, at
    most max_open_files at a time (least recently used closed first), so a reader is cheap to create in many
    processes; it holds no open file when pickled. Row groups it read stay decoded up to cache_bytes (least
    recently used dropped first; 0 = none kept). Not thread-safe: one thread reads through a reader.
    """

    def __init__(
        self, folder: str | Path, row_counts: Sequence[int] | None = None, max_open_files: int = MAX_OPEN_FILES,
        cache_bytes: int = ROW_GROUP_CACHE_BYTES,
    ):
        self.folder = Path(folder)
        self.paths = list_shards(self.folder)
        if row_counts is None:
            row_counts = [shard_row_count(p) for p in self.paths]
        if len(row_counts) != len(self.paths):
            raise ShardError(f"{self.folder}: {len(self.paths)} shards but {len(row_counts)} row counts")
        self.row_counts = np.asarray(row_counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.row_counts)])  # (S+1,)
        self.max_open_files = max(1, max_open_files)
        self._files: OrderedDict[int, tuple[pq.ParquetFile, np.ndarray]] = OrderedDict()
        self.cache_bytes = max(0, cache_bytes)
        self._groups: OrderedDict[tuple[int, int, tuple[str, ...]], pa.Table] = OrderedDict()
        self._group_bytes = 0

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"], state["_groups"], state["_group_bytes"] = OrderedDict(), OrderedDict(), 0
        return state

    def locate(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global row ids -> (shard number, row within the shard). Raises IndexError for ids out of range."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        if row_ids.size and (row_ids.min() < 0 or row_ids.max() >= self.num_rows):
            bad = row_ids[(row_ids < 0) | (row_ids >= self.num_rows)][0]
            raise IndexError(f"row id {bad} out of range: {self.folder} has {self.num_rows} rows")
        shard = np.searchsorted(self.offsets, row_ids, side="right") - 1
        return shard, row_ids - self.offsets[shard]

    def _file(self, shard: int) -> tuple[pq.ParquetFile, np.ndarray]:
        """The open file of a shard and the first row of each of its row groups (plus the total)."""
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        path = self.paths[shard]
        try:
            pf = pq.ParquetFile(path, memory_map=True)
        except (OSError, pa.ArrowException) as e:
            raise ShardReadError(f"{path}: not a readable parquet file ({e})") from None
        meta = pf.metadata
        if meta.num_rows != self.row_counts[shard]:
            raise ShardError(f"{path}: has {meta.num_rows} rows, expected {self.row_counts[shard]}; the folder changed")
        starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        self._files[shard] = (pf, starts)
        if len(self._files) > self.max_open_files:
            self._files.popitem(last=False)
        return pf, starts

    def read(self, row_ids: Sequence[int] | np.ndarray, columns: Sequence[str]) -> pa.Table:
        """The rows `row_ids` (in that order, repeats allowed) with only `columns`.

        Each needed row group is read once, however many of the asked rows it holds. Raises ShardReadError for
        damaged bytes, ShardError for a missing column or a shard whose row count changed.
        """
        row_ids = np.asarray(row_ids, dtype=np.int64)
        columns = list(columns)
        shard, local = self.locate(row_ids)
        pieces: list[pa.Table] = []
        order: list[np.ndarray] = []  # positions in row_ids of each piece's rows
        for s in np.unique(shard):
            pf, starts = self._file(int(s))
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise ShardError(f"{self.paths[s]}: no column {missing[0]!r} (has {', '.join(pf.schema_arrow.names)})")
            where = np.flatnonzero(shard == s)
            group = np.searchsorted(starts, local[where], side="right") - 1
            for g in np.unique(group):
                in_group = where[group == g]
                table = self._row_group(pf, int(s), int(g), columns)
                pieces.append(table.take(pa.array(local[in_group] - starts[g])))
                order.append(in_group)
        if not pieces:
            return pa.table({c: pa.array([], type=pa.null()) for c in columns})
        table = pa.concat_tables(pieces, promote_options="permissive")
        back = np.empty(len(row_ids), dtype=np.int64)
        back[np.concatenate(order)] = np.arange(len(row_ids))
        return table.take(pa.array(back))

    def _row_group(self, pf: pq.ParquetFile, shard: int, group: int, columns: list[str]) -> pa.Table:
        """One row group's `columns` of shard `shard` (open as `pf`), from the cache of decoded row groups when it
        is there."""
        key = (shard, group, tuple(columns))
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        try:
            table = pf.read_row_group(group, columns=columns)
        except (OSError, pa.ArrowException) as e:
            raise ShardReadError(f"{self.paths[shard]}: row group {group} cannot be read ({e})") from None
        if table.nbytes <= self.cache_bytes:
            self._groups[key] = table
            self._group_bytes += table.nbytes
            while self._group_bytes > self.cache_bytes:
                self._group_bytes -= self._groups.popitem(last=False)[1].nbytes
        return table


def image_values(column: pa.ChunkedArray | pa.Array) -> list[bytes | None]:
    """Encoded image bytes of an `image` column, as Python values.

    Accepts plain binary columns and the struct<bytes, path> that Hugging Face `datasets` writes for its Image
    feature (the source's datasets on the hub are stored that way); anything else gives None per row, which
    the decode guard counts as an empty image.
    """
    if pa.types.is_struct(column.type):
        if column.type.get_field_index("bytes") < 0:
            return [None] * len(column)
        column = pc.struct_field(column, "bytes")
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = column.cast(pa.large_binary())
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return [None] * len(column)
    return column.to_pylist()


def text_values(column: pa.ChunkedArray | pa.Array) -> list[object]:
    """Python values of a caption column. Text is returned as bytes so that invalid UTF-8 fails per row (in
    captions.caption_text), not for the whole column; a column that is not text gives None per row."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = column.cast(pa.large_binary())
    elif not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return [None] * len(column)
    return column.to_pylist()

