"""`sd3 recaption --input-dir RAW --output-dir OUT`: new `recaption` / `recaption_short` columns for raw shards.

Runs one process per GPU: alone, or under `torchrun --nproc-per-node N -m sd3 recaption ...`, where rank r takes
every N-th shard on cuda:LOCAL_RANK. Resumable: a shard whose output exists is skipped. Prints a JSON summary (rows
in / out, dropped by reason) and writes it to OUT/recaption_report.rank<r>.json. Models and rules: sd3/data/.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sd3.data.recaption import my_shards, recaption_shards
from sd3.devices import resolve_device, resolve_dtype
from sd3.encoders.captioners import DEFAULT_CAPTIONER, DEFAULT_SHORTENER, Captioner, Shortener
from sd3.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-dir", required=True, help="a folder of raw *.parquet shards (an `image` column)")
    parser.add_argument("--output-dir", required=True, help="where the recaptioned shards go (same file names)")
    parser.add_argument("--captioner", default=DEFAULT_CAPTIONER, help="LLaVA-NeXT hub id or folder")
    parser.add_argument("--shortener", default=DEFAULT_SHORTENER, help="chat LLM hub id or folder")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per generate call (source: 64)")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="captioner tokens per caption (source: 1024)")
    parser.add_argument("--short-max-new-tokens", type=int, default=96, help="shortener tokens per caption")
    parser.add_argument("--captioner-dtype", default="fp16", help="fp16 (the source's) | bf16 | fp32")
    parser.add_argument("--shortener-dtype", default="bf16", help="bf16 (the source's) | fp16 | fp32")
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK, else cpu) | cpu | cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def main(args: argparse.Namespace) -> int:
    input_dir, output_dir = Path(args.input_dir), Path(args.output_dir)
    if not input_dir.is_dir():
        raise ConfigError(f"--input-dir {input_dir} is not a folder")
    for name in ("batch_size", "max_new_tokens", "short_max_new_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    try:
        captioner_dtype = resolve_dtype(args.captioner_dtype, key="--captioner-dtype")
        shortener_dtype = resolve_dtype(args.shortener_dtype, key="--shortener-dtype")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    shards = my_shards(input_dir, rank, world)
    if not shards and rank == 0 and not any(input_dir.glob("*.parquet")):
        raise ConfigError(f"--input-dir {input_dir} holds no *.parquet shards")

    device = resolve_device(args.device)
    captioner = Captioner(args.captioner, device, captioner_dtype, args.max_new_tokens)
    shortener = Shortener(args.shortener, device, shortener_dtype, args.short_max_new_tokens)
    summary = recaption_shards(shards, output_dir, captioner, shortener, args.batch_size,
                               progress=not args.no_progress)
    report = {"rank": rank, "world_size": world, "shards": len(shards), **summary.as_dict()}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"recaption_report.rank{rank}.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    print(json.dumps(report, sort_keys=True), flush=True)
    return 0
