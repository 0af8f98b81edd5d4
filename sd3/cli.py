"""`sd3 <command>`: one entry point; each command lives in its own module under sd3/commands or sd3/bench.

A command module defines `add_arguments(parser)` and `main(args) -> int | None`. Modules are imported only
when their command runs, so `sd3 create-indices` never imports the model and `sd3 info` never imports pyarrow.
Commands that take `--config` also accept `--section.key=value` overrides (see sd3/config.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sd3.config import ConfigError

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("sd3.commands.info", "parameter count, training FLOPs per image and the resolved config"),
    "make-dataset": ("sd3.commands.make_dataset", "write raw shards of synthetic data (shapes) to try everything offline"),
    "import-folder": ("sd3.commands.import_folder", "turn an image folder + metadata.csv/json/jsonl into raw shards"),
    "create-phase": ("sd3.commands.create_phase", "resize raw shards into bucketed shards (sides multiples of 16)"),
    "create-indices": ("sd3.commands.create_indices", "map every bucket to its row ids across all shards"),
    "make-tiny": ("sd3.commands.make_tiny", "write tiny random-init encoders and VAE for offline tests"),
    "cache": ("sd3.commands.cache", "run the encoders once over the shards and write latents + embeddings"),
    "train": ("sd3.commands.train", "train the MMDiT (run under torchrun)"),
    "sample": ("sd3.commands.sample", "generate images from a checkpoint"),
    "recaption": ("sd3.commands.recaption", "recaption raw shards: LLaVA-NeXT captions, Llama shortens"),
    "quickstart": ("sd3.commands.quickstart", "from nothing: tiny encoders, shapes data, train on CPU, sample"),
    "bench": ("sd3.bench", "benchmarks: model | index | loader | pipeline | learn"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd3", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        # Sub-parsers are filled lazily in main(): only the chosen command's module is imported.
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def parse_command_args(module, prog: str, description: str, argv: list[str]) -> argparse.Namespace:
    """Parse a command's arguments; if it takes `--config`, collect `--section.key=value` into `args.overrides`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    module.add_arguments(parser)
    if not any(a.dest == "config" for a in parser._actions):
        return parser.parse_args(argv)
    args, unknown = parser.parse_known_args(argv)
    args.overrides = [u for u in unknown if u.startswith("--") and "." in u.split("=", 1)[0]]
    stray = [u for u in unknown if u not in args.overrides]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    return args


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
    except ConfigError as e:
        print(f"sd3 {name}: error: {e}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
