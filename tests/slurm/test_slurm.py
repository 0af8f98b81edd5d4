"""The slurm/ scripts on a real one-node SLURM: create_indices.sh builds the index the runs train on;
runjob_SLURM.sh goes sbatch -> srun -> torchrun -> `sd3 train` (1 loader + 2 model ranks on CPU) and checkpoints;
then pre-emption: SIGUSR1 to the batch shell -> agreed-step checkpoint -> requeue -> resume -> done."""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from slurm_cluster import REPO, Cluster, local_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

RUNJOB = REPO / "slurm" / "runjob_SLURM.sh"
CREATE_INDICES = REPO / "slurm" / "create_indices.sh"
# The CPU cluster has no GPUs: drop the script's GPU request, and run 1 loader + 2 model ranks per node.
SBATCH_OPTIONS = ["--gres=none", "--time=10:00"]
JOB_ENV = {"NPROC_PER_NODE": "3", "SD3_CONFIG": "tiny-cpu"}
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with local_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(scope="module")
def cluster_index(cluster: Cluster, shapes_phase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shapes phase folder's bucket index, built by slurm/create_indices.sh as a SLURM job."""
    work = tmp_path_factory.mktemp("index-job")
    index_path = work / "bucket_indices.npz"
    job_id = cluster.submit(CREATE_INDICES, [f"--cpus-per-task={len(os.sched_getaffinity(0))}", f"--chdir={work}"],
                            [str(shapes_phase.folder), str(index_path)], {"SD3_PYTHON": sys.executable},
                            work / "index-%j.out")
    job = cluster.wait_for(job_id, "the end of the job", lambda j: j.get("JobState") in FINISHED, timeout=90)
    assert job["JobState"] == "COMPLETED" and index_path.exists(), cluster.diagnostics(job_id)
    return index_path


@pytest.fixture(scope="module")
def train_overrides(tiny_models, shapes_phase, cluster_index: Path) -> list[str]:
    """Config overrides for a short tiny-cpu run on the shared tiny encoders and shapes data."""
    return [
        *tiny_models.overrides,
        f"--data.parquet_folder={shapes_phase.folder}",
        f"--data.bucket_indices_path={cluster_index}",
        "--train.log_every=1",
    ]


def job_env() -> dict[str, str]:
    return {**JOB_ENV, "SD3_PYTHON": sys.executable}


def latest_step(save_dir: Path) -> int | None:
    latest = save_dir / "latest"
    if not latest.exists():
        return None
    name = latest.read_text().strip()
    return int(Path(name).name.removeprefix("step-"))


def test_index_job_matches_a_local_run(cluster_index: Path, shapes_phase) -> None:
    from sd3.data.index import BucketIndex

    on_cluster, local = BucketIndex.load(cluster_index, shapes_phase.folder), BucketIndex.load(shapes_phase.index_path)
    assert on_cluster.buckets == local.buckets
    assert np.array_equal(on_cluster.offsets, local.offsets) and np.array_equal(on_cluster.row_ids, local.row_ids)


def test_job_runs_through_sbatch_and_checkpoints(cluster: Cluster, train_overrides: list[str], tmp_path: Path) -> None:
    save_dir = tmp_path / "run"
    job_id = cluster.submit(
        RUNJOB, [*SBATCH_OPTIONS, f"--chdir={tmp_path}"],
        [*train_overrides, "--train.total_steps=4", "--train.save_every=2", f"--train.save_dir={save_dir}"],
        job_env(), tmp_path / "job-%j.out")

    job = cluster.wait_for(job_id, "the end of the job", lambda j: j.get("JobState") in FINISHED, timeout=150)

    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", cluster.diagnostics(job_id)
    assert latest_step(save_dir) == 4, f"no checkpoint of step 4 in {save_dir}\n{cluster.diagnostics(job_id)}"
    assert (save_dir / "step-00000004" / "model.safetensors").exists()
    assert "on 2 model rank(s)" in cluster.output(job_id), cluster.diagnostics(job_id)


def test_preemption_checkpoints_requeues_and_resumes(cluster: Cluster, train_overrides: list[str],
                                                     tmp_path: Path) -> None:
    save_dir = tmp_path / "run"
    total_steps = 12
    job_id = cluster.submit(
        RUNJOB, [*SBATCH_OPTIONS, f"--chdir={tmp_path}"],
        [*train_overrides, f"--train.total_steps={total_steps}", "--train.save_every=2",
         f"--train.save_dir={save_dir}"],
        job_env(), tmp_path / "job-%j.out")

    # Progress = the first periodic checkpoint; then pre-empt as SLURM does before the time limit (`B:USR1`).
    cluster.wait_until(job_id, "the first checkpoint", lambda: latest_step(save_dir) is not None, timeout=150)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    # A requeued job waits ~120 s for its BeginTime: check what it left behind, then let it start now.
    cluster.wait_for(job_id, "the requeue", lambda j: int(j.get("Restarts", 0)) >= 1 and j.get("JobState") == "PENDING",
                     timeout=90)
    stopped_at = latest_step(save_dir)
    first_run = cluster.output(job_id)
    assert stopped_at is not None and stopped_at < total_steps, (
        f"checkpoint step {stopped_at}\n{cluster.diagnostics(job_id)}")
    assert re.search(rf"stop requested \([^)]*SIGUSR1[^)]*\): checkpoint at step {stopped_at} written", first_run), (
        f"no pre-emption checkpoint at step {stopped_at}\n{cluster.diagnostics(job_id)}")
    assert f"requeueing job {job_id}" in first_run
    # slurmd refuses a relaunch whose credential is dated the same second as the requeue revoked the old one
    # ("Job credential revoked"); the ~120 s hold exists for this. Once the node is idle, a second later is enough.
    cluster.wait_node_idle(timeout=60)
    time.sleep(1.5)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    job = cluster.wait_for(job_id, "the end of the resumed job", lambda j: j.get("JobState") in FINISHED, timeout=150)

    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", cluster.diagnostics(job_id)
    assert latest_step(save_dir) == total_steps, cluster.diagnostics(job_id)
    second_run = cluster.output(job_id)[len(first_run):]  # the log is appended to across the requeue
    assert re.search(rf"resuming from \S*step-{stopped_at:08d}, continuing exactly", second_run), (
        f"the requeued run did not resume from step {stopped_at}\n{cluster.diagnostics(job_id)}")
    steps_logged = [int(n) for n in re.findall(r"(?<!\w)step (\d+) loss=", second_run)]
    assert steps_logged and steps_logged[0] == stopped_at + 1 and steps_logged[-1] == total_steps, steps_logged
