"""`sd3 create-phase`: resize raw shards into bucketed phase shards (resumable, parallel over shards).

Damaged shards are skipped and counted; the exit code is 0 unless no usable row was produced (then 2).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from sd3.data.buckets import BUCKET_MODES
from sd3.data.phase import FORMATS, REPORT_FILE, PhaseOptions, create_phase
from sd3.data.shards import PHASE_ROW_GROUP_BYTES
from sd3.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-dir", required=True, help="folder of raw shards (image, recaption, recaption_short)")
    parser.add_argument("--output-dir", required=True, help="folder for the phase shards (same file names)")
    parser.add_argument("--max-res", type=int, default=256,
                        help="longest side (exact) or sqrt of the bucket area (area)")
    parser.add_argument("--patch-size", type=int, default=16, help="both sides become multiples of this")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes, one shard each")
    parser.add_argument("--format", choices=FORMATS, default="png", help="png is lossless")
    parser.add_argument("--quality", type=int, default=95, help="jpeg / webp quality")
    parser.add_argument("--bucket-mode", choices=BUCKET_MODES, default="exact",
                        help="exact: each side to the nearest multiple (source); "
                        "area: fixed aspect buckets of ~max_res^2 px")
    parser.add_argument("--row-group-mb", type=float, default=PHASE_ROW_GROUP_BYTES / 2**20,
                        help="MiB of images per parquet row group (a random row read costs one group)")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        opt = PhaseOptions(args.max_res, args.patch_size, args.format, args.quality, args.bucket_mode,
                           int(args.row_group_mb * 2**20))
    except ValueError as e:  # sizes that do not fit together: checked before any shard is read
        raise UserError(str(e)) from None
    summary = create_phase(args.input_dir, args.output_dir, opt, workers=args.workers, progress=not args.no_progress)
    print(summary.line())
    if summary.kept == 0:  # every shard skipped or every row dropped: the next stage would have nothing to index
        raise UserError(f"no usable rows in {args.input_dir}; see {Path(args.output_dir) / REPORT_FILE}")
    return 0
