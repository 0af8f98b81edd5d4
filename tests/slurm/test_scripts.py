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
    done = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "sideways"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "usage:" in done.stderr


def test_local_cluster_down_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "slurm.conf").write_text("ClusterName=production\n")
    done = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "down", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "not written by this script" in done.stderr
    assert (tmp_path / "slurm.conf").exists()


def fake_slurm(bin_dir: Path, record: Path) -> dict[str, str]:
    """scontrol and srun stand-ins on PATH: scontrol answers for node 'n1' at 10.1.2.3, srun records its call."""
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        'case "$1 $2" in\n'
        '  "show hostnames") echo n1; echo n2 ;;\n'
        '  "show node") echo "NodeName=n1 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=n1" ;;\n'
        "  *) exit 0 ;;\n"
        "esac\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        f'{{ echo "ARGS $*"; echo "NCCL_SOCKET_IFNAME=${{NCCL_SOCKET_IFNAME:-}}"; '
        f'echo "GLOO_SOCKET_IFNAME=${{GLOO_SOCKET_IFNAME:-}}"; }} >> {record}\n'
        'case "$*" in *" ip -4 -o addr show dev "*)\n'
        '  echo "2: ib0    inet 10.9.8.7/16 brd 10.9.255.255 scope global ib0";; esac\n')
    for f in ("scontrol", "srun"):
        (bin_dir / f).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "99999",
            "SLURM_JOB_NODELIST": "n[1-2]", "NPROC_PER_NODE": "3", "SLURM_CPUS_ON_NODE": "8",
            "SLURM_JOB_CPUS_PER_NODE": "8(x1),4"}


def test_gpu_ready_runjob_launch_line_port_address_cpus_and_console_script(tmp_path: Path) -> None:
    record = tmp_path / "srun.log"
    done = run_script("runjob_SLURM.sh", fake_slurm(tmp_path / "bin", record))
    assert done.returncode == 0, done.stderr
    launch = [line for line in record.read_text().splitlines() if "torch.distributed.run" in line]
    assert len(launch) == 1, record.read_text()
    words = launch[0].split()
    endpoint = words[words.index("--rdzv_endpoint") + 1]
    host, port = endpoint.rsplit(":", 1)
    assert host == "10.1.2.3" and 1024 <= int(port) < 32768  # scontrol's NodeAddr; below the ephemeral range
    assert "--cpus-per-task=4" in words  # the smaller node's count, not the batch node's 8
    assert "nodes have different CPU counts" in done.stdout
    # torchrun runs the console script: a checkout named sd3/ in the submit directory cannot shadow the package.
    at = words.index("--no-python")
    assert words[at + 1].endswith("/sd3") and words[at + 2] == "train" and "-m" not in words[at:]


def test_gpu_ready_runjob_interface_and_shutdown_settings(tmp_path: Path) -> None:
    record = tmp_path / "srun.log"
    env = fake_slurm(tmp_path / "bin", record) | {"SD3_IFNAME": "ib0", "SD3_SHUTDOWN_TIMEOUT": "300"}
    done = run_script("runjob_SLURM.sh", env)
    assert done.returncode == 0, done.stderr
    assert "SD3_SHUTDOWN_TIMEOUT=300 s is not below the 90 s" in done.stderr
    text = record.read_text()
    assert "--rdzv_endpoint 10.9.8.7:" in text  # the address on ib0, asked on the head node
    assert "NCCL_SOCKET_IFNAME=ib0" in text and "GLOO_SOCKET_IFNAME=ib0" in text


def test_gpu_ready_runjob_refuses_an_ephemeral_port(tmp_path: Path) -> None:
    env = fake_slurm(tmp_path / "bin", tmp_path / "srun.log") | {"SD3_RDZV_PORT": "39000"}
    done = run_script("runjob_SLURM.sh", env)
    assert done.returncode == 2 and "SD3_RDZV_PORT=39000: use a port in 1024..32767" in done.stderr
