"""`sd3 make-dataset shapes --out DIR --n N`: raw shards of synthetic data, to try every stage with no network."""

from __future__ import annotations

import argparse

from sd3.data.synthetic import write_shapes
from sd3.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=["shapes"], help="shapes: coloured shapes on coloured backgrounds")
    parser.add_argument("--out", required=True, help="folder for the raw shards")
    parser.add_argument("--n", type=int, default=2000, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-rows", type=int, default=1000, help="rows per shard")


def main(args: argparse.Namespace) -> int:
    if args.n < 1 or args.shard_rows < 1:
        raise UserError(f"--n {args.n} and --shard-rows {args.shard_rows} must both be >= 1")
    paths = write_shapes(args.out, args.n, seed=args.seed, shard_rows=args.shard_rows)
    print(f"make-dataset: wrote {args.n} shapes images in {len(paths)} shards to {args.out}")
    return 0
