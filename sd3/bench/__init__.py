"""`sd3 bench NAME`: benchmarks that measure ratios side by side in one run and end with one line of JSON.

Each benchmark is a module sd3/bench/NAME.py with `add_arguments(parser)` and `main(args)`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from sd3.commands.arguments import parse_command_args

BENCHMARKS = {
    "model": "our MMDiT vs diffusers SD3Transformer2DModel, forward+backward, bf16 and fp32",
    "index": "create-indices vs the source's row-by-row scan, on >= 1M rows",
    "loader": "images/s through a loader rank and its time split (decode / each text encoder / VAE)",
    "pipeline": "the 3-process CPU job: images/s per model rank, stall %, transport vs a bare gloo send",
    "learn": "does the tiny model learn the shapes data: true vs shuffled caption loss, colour accuracy",
    "balance": "loader-bound CPU job: planner's predicted stall vs the measured stall of the real torchrun job",
    "gpu": "CUDA: MMDiT fwd+bwd time and MFU, real-size encoders' images/s, peak memory, loader:model ratio",
    "sample_memory": "peak memory of sampling one image at a preset's model size (random weights, no checkpoint)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # argparse %-formats help strings: a literal % (as in "stall %") must be written %%.
    summary = "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()).replace("%", "%%")
    parser.add_argument("name", choices=sorted(BENCHMARKS), help=summary)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of that benchmark")


def main(args: argparse.Namespace) -> int | None:
    module = importlib.import_module(f"sd3.bench.{args.name}")
    inner = parse_command_args(module, f"sd3 bench {args.name}", BENCHMARKS[args.name], args.rest)
    return module.main(inner)


def print_result(figures: dict) -> None:
    """The last line every benchmark prints: its figures as one line of JSON, so runs can be compared."""
    sys.stdout.flush()
    print(json.dumps(figures, sort_keys=True), flush=True)
