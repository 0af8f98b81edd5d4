"""What the slurm/ scripts say before any cluster is involved: a wrong launch fails with one line naming the fix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from slurm_cluster import REPO


def run_script(name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NPROC_PER_NODE"))}
    return subprocess.run(["bash", str(REPO / "slurm" / name)], env={**clean, **env}, capture_output=True, text=True,
                          timeout=30)


def test_runjob_outside_sbatch_says_so() -> None:
    done = run_script("runjob_SLURM.sh", {})
    assert done.returncode != 0
    assert "run this script with sbatch" in done.stderr


def test_runjob_without_gpus_or_nproc_names_both_fixes() -> None:
    done = run_script("runjob_SLURM.sh", {"SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "7"})
    assert done.returncode == 2
    assert "--gres=gpu:N" in done.stderr and "NPROC_PER_NODE" in done.stderr


def test_local_cluster_usage() -> None:
    done = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "sideways"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "usage:" in done.stderr


def test_local_cluster_down_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "slurm.conf").write_text("ClusterName=production\n")
    done = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "down", str(tmp_path)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode != 0 and "not written by this script" in done.stderr
    assert (tmp_path / "slurm.conf").exists()
