"""`sd3 bench index`: create-indices against the source's row-by-row scan, on the same >= 1M-row shards.

The shards are phase shards as create-phase writes them (same writer, row groups of `--row-group-rows`,
64 by default: about 4 MiB of 256 px PNGs), with a tiny image payload and realistic bucket sizes (images of
random size and aspect ratio through the exact bucketing at 256 px).

The naive approach is the source's create_indices: open the dataset with every column, as `datasets` does,
and for each row i take `dataset[i]` (a one-row slice of the arrow table turned into a Python dict, which is
what `datasets` does per item) and append i to a dict of lists — in `--n-proc` processes over shards, as
the source's n_proc did. It is timed on the first shards only (`--naive-rows`) and its rate extrapolated to
all rows, which is stated in the output. Both results are compared on those rows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sd3.bench import print_result
from sd3.data.index import create_indices
from sd3.data.shards import PHASE_SCHEMA, list_shards, write_table
from sd3.errors import UserError

CAPTIONS = [
    "The image shows a lighthouse on a rocky coast at sunset, with waves breaking below it.",
    "A bowl of ramen with a soft-boiled egg, green onions and slices of pork on a wooden table.",
    "In this picture, a child in a yellow raincoat jumps into a puddle on a cobblestone street.",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in total")
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--row-group-rows", type=int, default=64, help="rows per parquet row group")
    parser.add_argument("--n-proc", type=int, default=2, help="workers for both approaches")
    parser.add_argument("--naive-rows", type=int, default=100_000, help="rows the naive scan is timed on")
    parser.add_argument("--repeats", type=int, default=5, help="create-indices runs; the median (and best) is reported")
    parser.add_argument("--dir", help="where to write the shards (default: a temporary folder, removed after)")
    parser.add_argument("--seed", type=int, default=0)


def bucket_names(n: int, rng: np.random.Generator, max_res: int = 256, patch: int = 16) -> np.ndarray:
    """Bucket names of n images of random size (long side 200..2000 px) and aspect ratio (log-normal)."""
    long_side = rng.uniform(200, 2000, n)
    aspect = np.exp(np.clip(rng.normal(0.0, 0.35, n), -1.4, 1.4))  # width / height
    width = np.where(aspect >= 1, long_side, long_side * aspect)
    height = np.where(aspect >= 1, long_side / aspect, long_side)
    scale = np.minimum(1.0, max_res / np.maximum(width, height))
    h = np.floor(height * scale / patch + 0.5).astype(np.int64) * patch
    w = np.floor(width * scale / patch + 0.5).astype(np.int64) * patch
    codes = h * 100_000 + w
    uniq, inverse = np.unique(codes, return_inverse=True)
    names = np.array([f"{c // 100_000}x{c % 100_000}" for c in uniq])
    return names[inverse]


def write_shards(folder: Path, rows: int, shards: int, row_group_rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    per_shard = -(-rows // shards)
    for s in range(shards):
        n = min(per_shard, rows - s * per_shard)
        if n <= 0:
            break
        names = bucket_names(n, rng)
        hw = np.array([name.split("x") for name in np.unique(names)], dtype=np.int32)
        lookup = {name: (int(h), int(w)) for name, (h, w) in zip(np.unique(names), hw, strict=True)}
        heights = np.array([lookup[x][0] for x in names], dtype=np.int32)
        widths = np.array([lookup[x][1] for x in names], dtype=np.int32)
        captions = np.array(CAPTIONS)[rng.integers(0, len(CAPTIONS), n)]
        table = pa.table(
            {
                "image": pa.array([b"\x89PNG tiny"] * n, pa.binary()),
                "recaption": pa.array(captions),
                "recaption_short": pa.array(np.char.partition(captions, ",")[:, 0]),
                "height": pa.array(heights),
                "width": pa.array(widths),
                "aspect_ratio": pa.array((widths / heights).astype(np.float32)),
                "bucket_size": pa.array(names),
            },
            schema=PHASE_SCHEMA,
        )
        write_table(folder / f"shard-{s:05d}.parquet", table, row_group_rows=row_group_rows)


def naive_shard(path: str, offset: int) -> dict[str, list[int]]:
    """The source's way, for one shard: every column loaded, then dataset[i] row by row."""
    table = pq.read_table(path)  # datasets memory-maps every column of the shard
    buckets: dict[str, list[int]] = defaultdict(list)
    for i in range(table.num_rows):
        row = table.slice(i, 1).to_pylist()[0]  # what `dataset[i]` does: a one-row slice formatted as a dict
        buckets[row["bucket_size"]].append(offset + i)
    return buckets


def naive_index(paths: list[Path], offsets: list[int], n_proc: int) -> dict[str, list[int]]:
    merged: dict[str, list[int]] = defaultdict(list)
    with ProcessPoolExecutor(max_workers=n_proc) as pool:
        for part in pool.map(naive_shard, [str(p) for p in paths], offsets):
            for name, ids in part.items():
                merged[name].extend(ids)
    return merged


def main(args: argparse.Namespace) -> int:
    if args.rows < 1 or args.shards < 1:
        raise UserError(f"--rows {args.rows} and --shards {args.shards} must both be >= 1")
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="sd3-bench-index-"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_shards(folder, args.rows, args.shards, args.row_group_rows, args.seed)
        print(f"bench index: wrote {args.rows} rows in {args.shards} shards to {folder} "
              f"in {time.perf_counter() - start:.1f} s")

        index_path = folder / "bucket_indices.npz"
        times = []
        for _ in range(max(1, args.repeats)):
            start = time.perf_counter()
            index = create_indices(folder, index_path, n_proc=args.n_proc)
            times.append(time.perf_counter() - start)
        fast_s = statistics.median(times)
        fast_rate = index.num_rows / fast_s
        print(f"bench index: create-indices (n_proc={args.n_proc}): {fast_s:.3f} s median of {len(times)} "
              f"(best {min(times):.3f} s) -> {fast_rate:,.0f} rows/s, {len(index.buckets)} buckets")

        paths = list_shards(folder)
        counts = index.manifest["rows"]
        take, covered = 0, 0
        while take < len(paths) and covered < args.naive_rows:
            covered += counts[take]
            take += 1
        offsets = list(np.concatenate([[0], np.cumsum(counts)])[:take].astype(int))
        start = time.perf_counter()
        naive = naive_index(paths[:take], offsets, args.n_proc)
        naive_s = time.perf_counter() - start
        naive_rate = covered / naive_s
        print(f"bench index: naive row-by-row scan (n_proc={args.n_proc}) on the first {covered} rows ({take} shards): "
              f"{naive_s:.2f} s -> {naive_rate:,.0f} rows/s; extrapolated to {index.num_rows} rows: "
              f"{index.num_rows / naive_rate:.0f} s")

        agree = all(
            naive.get(name, []) == index.rows(name)[index.rows(name) < covered].tolist() for name in index.buckets
        ) and set(naive) <= set(index.buckets)
        speedup = fast_rate / naive_rate
        print(f"bench index: create-indices is {speedup:,.0f}x the naive scan; "
              f"results agree on the common rows: {agree}")
        print_result(
            {
                "bench": "index",
                "dtype": "none (no tensors)",
                "rows": index.num_rows,
                "shards": len(paths),
                "row_group_rows": args.row_group_rows,
                "buckets": len(index.buckets),
                "n_proc": args.n_proc,
                "create_indices_s": round(fast_s, 4),
                "create_indices_best_s": round(min(times), 4),
                "create_indices_rows_per_s": round(fast_rate),
                "naive_rows_timed": covered,
                "naive_s": round(naive_s, 3),
                "naive_rows_per_s": round(naive_rate),
                "naive_extrapolated": covered < index.num_rows,
                "speedup": round(speedup, 1),
                "agree": agree,
                "goal_1M_rows_per_s": fast_rate >= 1e6,
                "goal_100x": speedup >= 100,
                "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on this machine skews both timings
            }
        )
        return 0 if agree else 1
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
