"""Launching from a folder that holds a checkout named sd3/ (issue 17 item 3): `torchrun --no-python sd3 train`.

`torchrun -m sd3` starts `python -m sd3`, which puts the working directory first on sys.path; a directory `sd3/`
there (the repository, with its `data/` folder) then becomes the `sd3` namespace package and every rank fails with
`No module named 'sd3.data.batches'`. The console script has its own directory first instead. Both runs stop at
the first thing `sd3 train` checks after importing the package (a topology that needs 3 ranks, given 1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sd3

SCRIPT = shutil.which("sd3", path=str(Path(sys.executable).parent)) or shutil.which("sd3")
TOPOLOGY_ERROR = "sd3 train: error: topology.loaders_per_node 1 x (1 + models_per_loader 2) = 3 ranks per node"


def launch(folder: Path, *entry: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", *entry, "train",
           "--config", "tiny-cpu", "--topology.loaders_per_node=1", "--topology.models_per_loader=2"]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(SCRIPT is None, reason="the sd3 console script is not installed (pip install -e .)")
def test_console_script_launch_works_beside_a_checkout_named_sd3(tmp_path):
    (tmp_path / "sd3" / "data").mkdir(parents=True)  # a checkout's top level: no __init__.py, its own data/
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    # The control: `-m sd3` from there imports the folder, not the installed package.
    shadowed = launch(tmp_path, "-m", "sd3", env=base)
    assert shadowed.returncode != 0 and "No module named 'sd3.data" in shadowed.stderr
    # The launch line of README and slurm/runjob_SLURM.sh, with this tree's sd3 first (as an install would be).
    tree = str(Path(sd3.__file__).resolve().parent.parent)
    done = launch(tmp_path, "--no-python", SCRIPT, env={**base, "PYTHONPATH": tree})
    assert "No module named" not in done.stderr
    assert TOPOLOGY_ERROR in done.stderr, done.stderr[-2000:]


def test_the_commands_that_start_torchrun_use_the_console_script():
    """`sd3 quickstart` and `sd3 bench balance` start their ranks the way README does, not with `-m sd3`."""
    from sd3.commands.arguments import torchrun_entry

    beside = shutil.which("sd3", path=str(Path(sys.executable).parent))
    assert torchrun_entry() == (["--no-python", beside] if beside else ["-m", "sd3"])
