"""A command's argument parsing, shared by `sd3 <command>` (sd3/cli.py), `sd3 bench NAME` and the quick start.

A command module defines `add_arguments(parser)` and `main(args) -> int | None`. Commands that take `--config`
also accept `--section.key=value` overrides, collected into `args.overrides` (checked by sd3/config_loader.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import typing
from pathlib import Path
from types import ModuleType


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (exit 2) like every other user error; the usage is in --help."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_command_args(module: ModuleType, prog: str, description: str, argv: list[str]) -> argparse.Namespace:
    """Parse a command's arguments; if it takes `--config`, collect `--section.key=value` into `args.overrides`."""
    parser = Parser(prog=prog, description=description)
    module.add_arguments(parser)
    if not any(a.dest == "config" for a in parser._actions):
        return parser.parse_args(argv)
    args, unknown = parser.parse_known_args(argv)
    args.overrides = [u for u in unknown if u.startswith("--") and "." in u.split("=", 1)[0]]
    stray = [u for u in unknown if u not in args.overrides]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    return args


def run_command(module: ModuleType, prog: str, argv: list[str], description: str = "") -> int:
    """Parse `argv` for `module` and run it in this process; its exit code (errors propagate to the caller)."""
    return int(module.main(parse_command_args(module, prog, description, argv)) or 0)


def torchrun_entry() -> list[str]:
    """What follows torchrun's own options to start `sd3` on every rank: this environment's console script
    (`--no-python sd3`), whose own directory comes first on sys.path, so a checkout named sd3/ in the working directory
    cannot shadow the package as it does under `-m sd3`; `-m sd3` only where no console script is installed."""
    script = shutil.which("sd3", path=str(Path(sys.executable).parent))
    return ["--no-python", script] if script else ["-m", "sd3"]
