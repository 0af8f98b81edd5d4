"""`sd3 <command>`: one entry point; each command lives in its own module under sd3/commands or sd3/bench.

A command module defines `add_arguments(parser)` and `main(args) -> int | None` (sd3/commands/arguments.py).
Modules are imported only when their command runs, so `sd3 create-indices` never imports the model and
`sd3 info` never imports pyarrow. Commands that take `--config` also accept `--section.key=value` overrides.

Exit codes: 0 done; 2 a user error (bad argument, path, file or value: one line on stderr naming the culprit,
sd3/errors.py); 1 an internal failure, with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sd3.commands.arguments import Parser, parse_command_args
from sd3.errors import user_error_line

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("sd3.commands.info", "parameter count, training FLOPs per image and the resolved config"),
    "plan": ("sd3.commands.plan", "loader:model balance before a launch: FLOPs per part, stall per layout"),
    "make-dataset": ("sd3.commands.make_dataset", "raw shards of synthetic data (shapes) to try everything offline"),
    "import-folder": ("sd3.commands.import_folder", "turn an image folder + metadata.csv/json/jsonl into raw shards"),
    "create-phase": ("sd3.commands.create_phase", "resize raw shards into bucketed shards (sides multiples of 16)"),
    "create-indices": ("sd3.commands.create_indices", "map every bucket to its row ids across all shards"),
    "make-tiny": ("sd3.commands.make_tiny", "write tiny random-init encoders and VAE for offline tests"),
    "cache": ("sd3.commands.cache", "run the encoders once over the shards and write latents + embeddings"),
    "train": ("sd3.commands.train", "train the MMDiT (run under torchrun)"),
    "sample": ("sd3.commands.sample", "generate images from a checkpoint"),
    "import-seed": ("sd3.commands.import_seed", "convert a source (gmongaras/SD3-From-Scratch) checkpoint into ours"),
    "eval": ("sd3.commands.eval", "FID (Inception pool features) and CLIP score of a checkpoint vs reference data"),
    "export": ("sd3.commands.export", "a hub-ready folder (EMA safetensors, config, model card); --push-to-hub"),
    "recaption": ("sd3.commands.recaption", "recaption raw shards: LLaVA-NeXT captions, Llama shortens"),
    "quickstart": ("sd3.commands.quickstart", "from nothing: tiny encoders, shapes data, train on CPU, sample"),
    "bench": ("sd3.bench", "benchmarks: model, index, loader, pipeline, learn, balance, gpu, sample_memory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sd3", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_module, help_text) in COMMANDS.items():
        # Sub-parsers are filled lazily in main(): only the chosen command's module is imported.
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints help or the "invalid choice" error and exits
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    args = parse_command_args(module, f"sd3 {name}", COMMANDS[name][1], argv[1:])
    try:
        code = module.main(args)
    except Exception as e:
        line = user_error_line(e)
        if line is None:
            raise  # an internal failure: the traceback is what a bug report needs (exit 1)
        print(f"sd3 {name}: error: {line}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
