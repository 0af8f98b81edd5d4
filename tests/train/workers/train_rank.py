"""torchrun worker of the training tests: `sd3 train` for one rank, plus two things only a test needs.

Usage: torchrun ... tests/train/workers/train_rank.py PRESET --section.key=value ...
Writes its pid to <save_dir>/pids/rank<RANK>.pid (so a test can signal one rank) and, on a model rank that
finished training, its weights to <save_dir>/weights/model-rank<R>.safetensors (so a test can compare replicas).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from sd3.commands.train import run
from sd3.config_loader import load_config


def main(argv: list[str]) -> int:
    cfg = load_config(argv[0], argv[1:])
    save_dir = Path(cfg.train.save_dir)
    (save_dir / "pids").mkdir(parents=True, exist_ok=True)
    (save_dir / "pids" / f"rank{os.environ.get('RANK', '0')}.pid").write_text(str(os.getpid()))

    def dump(trainer) -> None:
        out = save_dir / "weights"
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()}
        save_file(state, str(out / f"model-rank{trainer.ranks.rank}.safetensors"))

    return run(cfg, after_train=dump)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
