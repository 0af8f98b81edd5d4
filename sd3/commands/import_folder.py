"""`sd3 import-folder --images DIR --metadata FILE --out DIR`: DiffSynth-Studio-style folder -> raw shards."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sd3.data.import_folder import import_folder
from sd3.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder the metadata's `image` paths are relative to")
    parser.add_argument("--metadata", help="metadata.csv | .json | .jsonl (default: the one in --images)")
    parser.add_argument("--out", required=True, help="folder for the raw shards")
    parser.add_argument("--shard-rows", type=int, default=1000)


def _find_metadata(images: Path) -> Path:
    for name in ("metadata.csv", "metadata.json", "metadata.jsonl"):
        if (images / name).is_file():
            return images / name
    raise UserError(f"no metadata.csv/.json/.jsonl in {images}; pass --metadata")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    metadata = Path(args.metadata) if args.metadata else _find_metadata(Path(args.images))
    summary = import_folder(args.images, metadata, args.out, shard_rows=args.shard_rows)
    print(summary.line())
    return 0 if summary.imported else 1
