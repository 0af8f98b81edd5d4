"""`create-indices`: bucket -> global row ids across every shard of a folder, and the saved index.

The source walked every row in Python over a `datasets` table and pickled a dict — "about a day" for its corpus.
Here each shard's `bucket_size` column is read alone and dictionary-encoded in one vectorised call, so a shard
costs one read; rows are then grouped by bucket with one integer sort. Shards are read by a thread pool:
pyarrow releases the GIL while it reads and decodes, and threads cost nothing to start.

The index is an `.npz` (loaded with allow_pickle=False) holding the bucket names, the row ids grouped by bucket
with their offsets, and a JSON manifest of the folder (shard names, byte sizes, row counts). Loading checks the
manifest against the folder, so training never silently samples rows that moved.
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sd3.data.shards import ShardError, ShardReader, list_shards

log = logging.getLogger(__name__)

INDEX_VERSION = 1
BUCKET_RE = re.compile(r"^(\d+)x(\d+)$")


class IndexMismatchError(RuntimeError):
    """The shard folder is not the one the index was built from."""


def parse_bucket(name: str) -> tuple[int, int]:
    """"HxW" -> (height, width)."""
    m = BUCKET_RE.match(name)
    if not m:
        raise ValueError(f"bucket_size {name!r} is not 'HxW'")
    return int(m.group(1)), int(m.group(2))


def folder_manifest(folder: str | Path) -> dict:
    """Shard names and byte sizes of a folder, in row-id order (cheap: one stat per shard)."""
    paths = list_shards(folder)
    return {"shards": [p.name for p in paths], "bytes": [p.stat().st_size for p in paths]}


def _read_shard_buckets(path: Path) -> tuple[list[str], np.ndarray]:
    """One shard's bucket names and, per row, the position of its bucket in that list (-1 = null)."""
    try:
        # ParquetFile.read, not pq.read_table: the dataset layer behind read_table costs ~3x more per row group.
        # Plain strings then one dictionary_encode over the whole column: per-row-group dictionaries would
        # have to be unified chunk by chunk, which costs twice the read.
        pf = pq.ParquetFile(path, memory_map=True)
        if "bucket_size" not in pf.schema_arrow.names:
            raise ShardError(f"{path}: no column 'bucket_size'; is this a phase folder made by `sd3 create-phase`?")
        table = pf.read(columns=["bucket_size"], use_threads=False)
    except (OSError, pa.ArrowInvalid) as e:
        raise ShardError(f"{path}: cannot read column 'bucket_size' ({e})") from None
    column = table.column("bucket_size").combine_chunks()
    if not pa.types.is_string(column.type):
        try:
            column = column.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ShardError(f"{path}: column 'bucket_size' is {column.type}, not text ({e})") from None
    encoded = pc.dictionary_encode(column)
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
    return encoded.dictionary.to_pylist(), codes


@dataclass
class BucketIndex:
    """Row ids of a shard folder grouped by bucket.

    buckets: names "HxW" (height first); row_ids: int64, the rows of bucket i are row_ids[offsets[i]:offsets[i+1]]
    in increasing order; manifest: {"shards", "bytes", "rows", "skipped_rows"} of the folder it was built from.
    """

    buckets: list[str]
    row_ids: np.ndarray
    offsets: np.ndarray
    manifest: dict

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each bucket."""
        return [parse_bucket(b) for b in self.buckets]

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    def rows(self, bucket: int | str) -> np.ndarray:
        i = self.buckets.index(bucket) if isinstance(bucket, str) else bucket
        return self.row_ids[self.offsets[i] : self.offsets[i + 1]]

    def reader(self, folder: str | Path) -> ShardReader:
        """A ShardReader for the folder this index describes, using the manifest's row counts."""
        return ShardReader(folder, row_counts=self.manifest["rows"])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(
            tmp,
            version=np.array(INDEX_VERSION),
            buckets=np.array(self.buckets, dtype=np.str_),
            row_ids=self.row_ids.astype(np.int64),
            offsets=self.offsets.astype(np.int64),
            manifest=np.array(json.dumps(self.manifest)),
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, folder: str | Path | None = None) -> BucketIndex:
        """Read an index; with `folder`, also check that the folder still matches it (IndexMismatchError if not)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"bucket index {path} not found: run `sd3 create-indices` first")
        with np.load(path, allow_pickle=False) as z:
            version = int(z["version"])
            if version != INDEX_VERSION:
                raise IndexMismatchError(
                    f"{path}: index format {version}, expected {INDEX_VERSION}; re-run `sd3 create-indices`"
                )
            index = cls(
                buckets=[str(b) for b in z["buckets"]],
                row_ids=z["row_ids"],
                offsets=z["offsets"],
                manifest=json.loads(str(z["manifest"])),
            )
        if folder is not None:
            index.check(folder, path)
        return index

    def check(self, folder: str | Path, path: str | Path = "the index") -> None:
        """Raise IndexMismatchError naming what changed if the folder's shards differ from the manifest."""
        now = folder_manifest(folder)
        # folder_manifest writes one size per shard name, so the two lists always pair up.
        old = dict(zip(self.manifest["shards"], self.manifest["bytes"], strict=True))
        new = dict(zip(now["shards"], now["bytes"], strict=True))
        changes = [f"missing {n}" for n in old if n not in new]
        changes += [f"new {n}" for n in new if n not in old]
        changes += [f"{n} is {new[n]} bytes, was {old[n]}" for n in old if n in new and new[n] != old[n]]
        if changes:
            shown = "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
            raise IndexMismatchError(
                f"{path} does not match shard folder {folder} ({shown}): re-run `sd3 create-indices`"
            )


def create_indices(folder: str | Path, out_path: str | Path | None = None, n_proc: int = 4) -> BucketIndex:
    """Index every row of a shard folder by its `bucket_size`; save to `out_path` when given.

    Rows whose bucket_size is null or not "HxW" are left out and counted in manifest["skipped_rows"].
    """
    folder = Path(folder)
    manifest = folder_manifest(folder)
    paths = [folder / name for name in manifest["shards"]]
    if not paths:
        raise ShardError(f"{folder}: no .parquet shards")
    # Map each shard's local dictionary onto one global list of bucket names, shard by shard in order as the
    # reads complete, so this overlaps with the reading of later shards.
    names: dict[str, int] = {}
    codes, rows = [], []
    with ThreadPoolExecutor(max_workers=max(1, n_proc)) as pool:
        for names_local, local in pool.map(_read_shard_buckets, paths):
            lookup = [names.setdefault(n, len(names)) if BUCKET_RE.match(n) else -1 for n in names_local]
            # -1 indexes the trailing -1: nulls stay invalid
            codes.append(np.array(lookup + [-1], dtype=np.int32)[local])
            rows.append(len(local))
    code = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int32)  # (N,) bucket of each global row
    valid = code >= 0
    skipped = int((~valid).sum())
    if skipped:
        log.warning("%s: %d rows have no valid bucket_size and are not indexed", folder, skipped)

    # Sort buckets by size (largest first reads well in logs); a stable sort keeps row ids increasing per bucket.
    counts = np.bincount(code[valid], minlength=len(names))
    order = np.argsort(-counts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    key = np.where(valid, rank[np.maximum(code, 0)], len(names))
    key = key.astype(np.int16 if len(names) < 2**15 else np.int32)  # int16 sorts with a radix sort
    row_ids = np.argsort(key, kind="stable")[: int(valid.sum())].astype(np.int64, copy=False)
    offsets = np.concatenate([[0], np.cumsum(counts[order])]).astype(np.int64)

    manifest["rows"] = rows
    manifest["skipped_rows"] = skipped
    bucket_names = list(names)
    index = BucketIndex([bucket_names[i] for i in order], row_ids, offsets, manifest)
    if out_path is not None:
        index.save(out_path)
    return index
