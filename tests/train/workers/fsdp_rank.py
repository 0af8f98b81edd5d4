"""torchrun worker of the FSDP tests: `sd3 train` for one rank, plus what the resumed weights were.

Usage: torchrun ... tests/train/workers/fsdp_rank.py PRESET --section.key=value ...
Right after the Checkpointer loaded a checkpoint, every model rank gathers the full model, EMA and optimizer state
back out of the (possibly sharded) components — the same collectives a save makes — and rank 0 writes them to
<save_dir>/loaded/{model,ema}.safetensors and optimizer.pt, so a test can compare them with the files it resumed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from sd3.commands.train import run
from sd3.config_loader import load_config
from sd3.train.checkpointer import Checkpointer

_load = Checkpointer.load


def load_and_dump(self: Checkpointer, plan) -> None:
    _load(self, plan)
    model, ema = self.components["model"].state_dict(), self.components["ema"].state_dict()
    optimizer = self.components["optimizer"].state_dict()
    if self.is_main:
        out = Path(self.cfg.train.save_dir) / "loaded"
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.items()}, str(out / "model.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(out / "ema.safetensors"))
        torch.save(optimizer, out / "optimizer.pt")


def main(argv: list[str]) -> int:
    Checkpointer.load = load_and_dump
    return run(load_config(argv[0], argv[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
