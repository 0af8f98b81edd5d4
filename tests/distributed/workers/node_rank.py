"""torchrun worker of the two-node tests: records which node (torchrun agent) this rank runs on, then is the
training tests' worker (tests/train/workers/train_rank.py: `sd3 train` for one rank, pids and final weights).

Usage: torchrun --nnodes 2 ... tests/distributed/workers/node_rank.py PRESET --section.key=value ...
Writes <save_dir>/nodes/rank<RANK>.json = {"rank", "group_rank", "local_rank", "local_world_size"}.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

from sd3.config_loader import load_config

TRAIN_RANK = Path(__file__).resolve().parents[2] / "train" / "workers" / "train_rank.py"

if __name__ == "__main__":
    save_dir = Path(load_config(sys.argv[1], sys.argv[2:]).train.save_dir)
    (save_dir / "nodes").mkdir(parents=True, exist_ok=True)
    facts = {key.lower(): int(os.environ[key]) for key in ("RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    (save_dir / "nodes" / f"rank{facts['rank']}.json").write_text(json.dumps(facts))
    sys.argv[0] = str(TRAIN_RANK)
    runpy.run_path(str(TRAIN_RANK), run_name="__main__")
