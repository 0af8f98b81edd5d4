"""`sd3 create-indices`: bucket -> row ids over every shard of a phase folder, saved with a manifest."""

from __future__ import annotations

import argparse
import logging
import os
import time

from sd3.data.index import create_indices


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-parquet-folder", required=True, help="folder of phase shards")
    parser.add_argument("--bucket-indices-path", required=True, help="output .npz")
    parser.add_argument("--n-proc", type=int, default=os.cpu_count() or 1, help="shards read in parallel")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    index = create_indices(args.data_parquet_folder, args.bucket_indices_path, n_proc=args.n_proc)
    seconds = time.perf_counter() - start
    print(
        f"create-indices: {index.num_rows} rows in {len(index.buckets)} buckets from "
        f"{len(index.manifest['shards'])} shards in {seconds:.2f} s -> {args.bucket_indices_path}"
    )
    largest = ", ".join(f"{b} ({c})" for b, c in zip(index.buckets[:5], index.counts[:5], strict=True))
    print(f"create-indices: largest buckets: {largest}")
    if index.manifest["skipped_rows"]:
        print(f"create-indices: {index.manifest['skipped_rows']} rows without a valid bucket_size were left out")
    return 0
