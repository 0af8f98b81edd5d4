"""A SLURM cluster for the tests in this directory, brought up by slurm/local_cluster.sh.

`local_cluster(directory, nodes=1)` starts slurmctld + slurmd(s) with their own slurm.conf in `directory` and always
shuts them down afterwards; with nodes >= 2 each node is a network namespace and every client command runs in node
1's. It skips only when SLURM cannot be started here at all (the script exits 77: not root, the Debian packages
cannot be installed, no network namespaces); any other failure to start is a test error.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "slurm" / "local_cluster.sh"
CANNOT_START = 77


class Cluster:
    """Submit to and query the local cluster; every command gets this cluster's SLURM_CONF."""

    def __init__(self, directory: Path, slurm_conf: str, netns: str | None = None,
                 nodes: list[str] | None = None) -> None:
        self.directory = directory
        self.env = {**os.environ, "SLURM_CONF": slurm_conf}
        self.outputs: dict[str, Path] = {}  # job id -> its output file
        # Several nodes: the controller listens in node 1's network namespace.
        self.prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
        self.nodes = nodes or ["localhost"]

    def run(self, *command: str) -> str:
        done = subprocess.run([*self.prefix, *command], env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def submit(self, script: Path, sbatch_options: list[str], script_args: list[str], env: dict[str, str],
               output: Path) -> str:
        """`sbatch --parsable`; returns the job id. Never `--wait`: it polls at 2, 10, 42 s, then every 32 s."""
        command = [*self.prefix, "sbatch", "--parsable", f"--output={output}", *sbatch_options, str(script),
                   *script_args]
        done = subprocess.run(command, env={**self.env, **env}, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"sbatch exited {done.returncode}: {done.stderr.strip()}")
        job_id = done.stdout.strip().split(";")[0]
        self.outputs[job_id] = Path(str(output).replace("%j", job_id))
        return job_id

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        line = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait_for(self, job_id: str, what: str, condition: Callable[[dict[str, str]], bool],
                 timeout: float) -> dict[str, str]:
        """Poll the job once a second until `condition(job)` holds; on timeout fail with everything worth reading."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if condition(job):
                return job
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id}: {what} not reached within {timeout:.0f} s "
                            f"(JobState={job.get('JobState')} Reason={job.get('Reason')})\n{self.diagnostics(job_id)}")
            time.sleep(1.0)

    def wait_until(self, job_id: str, what: str, condition: Callable[[], bool], timeout: float) -> None:
        """Poll any condition (a file appearing, ...) while the job runs; fail early if the job ended."""
        deadline = time.monotonic() + timeout
        while not condition():
            job = self.job(job_id)
            if job.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
                pytest.fail(f"job {job_id} ended ({job.get('JobState')}) before {what}\n{self.diagnostics(job_id)}")
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id}: {what} not seen within {timeout:.0f} s\n{self.diagnostics(job_id)}")
            time.sleep(1.0)

    def wait_node_idle(self, timeout: float) -> None:
        """Wait until every node has cleaned up after its last job (state `idle`, not `completing`)."""
        deadline = time.monotonic() + timeout
        while (states := set(self.run("sinfo", "-h", "-N", "-o", "%T").split())) != {"idle"}:
            if time.monotonic() > deadline:
                pytest.fail(f"nodes not idle within {timeout:.0f} s (states {sorted(states)})")
            time.sleep(0.5)

    def output(self, job_id: str) -> str:
        path = self.outputs.get(job_id)
        return path.read_text(errors="replace") if path and path.exists() else "(no output file)"

    def diagnostics(self, job_id: str) -> str:
        parts = [f"---- scontrol show job {job_id}", self._try("scontrol", "show", "job", job_id),
                 f"---- job output {self.outputs.get(job_id)}", self.output(job_id)]
        for log in ["slurmctld.log", *(p.name for p in sorted(self.directory.glob("slurmd*.log")))]:
            path = self.directory / log
            text = path.read_text(errors="replace").splitlines()[-40:] if path.exists() else ["(missing)"]
            parts += [f"---- {log} (last 40 lines)", "\n".join(text)]
        return "\n".join(parts)

    def _try(self, *command: str) -> str:
        try:
            return self.run(*command)
        except (AssertionError, subprocess.TimeoutExpired) as e:
            return str(e)


@contextlib.contextmanager
def local_cluster(directory: Path, nodes: int = 1) -> Iterator[Cluster]:
    up = subprocess.run([str(LOCAL_CLUSTER), "up", "--nodes", str(nodes), str(directory)], capture_output=True,
                        text=True, timeout=900)
    if up.returncode == CANNOT_START:
        pytest.skip(f"SLURM cannot be started here: {up.stderr.strip().splitlines()[-1]}")
    if up.returncode != 0:
        pytest.fail(f"slurm/local_cluster.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
    printed = dict(line.split("=", 1) for line in up.stdout.strip().splitlines() if "=" in line)
    names = [f"n{k}" for k in range(1, nodes + 1)] if nodes > 1 else ["localhost"]
    try:
        yield Cluster(directory, printed["SLURM_CONF"], printed.get("SLURM_NETNS"), names)
    finally:
        down = subprocess.run([str(LOCAL_CLUSTER), "down", str(directory)], capture_output=True, text=True, timeout=120)
        if down.returncode != 0:
            print(f"slurm/local_cluster.sh down failed ({down.returncode}): {down.stderr}")
