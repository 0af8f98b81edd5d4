"""runjob_SLURM.sh on a real two-node SLURM cluster (slurm/local_cluster.sh --nodes 2: each node a network namespace
with its own address and hostname): sbatch --nodes=2 -> srun -> one torchrun per node meeting at the head node ->
2 nodes x (1 loader + 2 model ranks) over gloo; then pre-emption: SIGUSR1 -> agreed-step checkpoint -> requeue ->
resume on both nodes -> done."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_slurm as one_node
from slurm_cluster import Cluster, local_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Both nodes' links are named sd3link: the rendezvous address and gloo's sockets use it (SD3_IFNAME).
TWO_NODE_ENV = {"SD3_IFNAME": "sd3link"}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with local_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2) as running:
        yield running


def test_two_nodes_preempt_requeue_resume(two_nodes: Cluster, tiny_models, shapes_phase, tmp_path: Path) -> None:
    save_dir = tmp_path / "run"
    total_steps = 10
    overrides = [
        *tiny_models.overrides, f"--data.parquet_folder={shapes_phase.folder}",
        f"--data.bucket_indices_path={shapes_phase.index_path}", "--train.log_every=1",
        "--data.batch_size=2", f"--train.total_steps={total_steps}", "--train.save_every=2",
        f"--train.save_dir={save_dir}",
    ]
    job_id = two_nodes.submit(
        one_node.RUNJOB, [*one_node.SBATCH_OPTIONS, "--nodes=2", f"--chdir={tmp_path}"], overrides,
        {**one_node.job_env(), **TWO_NODE_ENV}, tmp_path / "job-%j.out")

    two_nodes.wait_until(job_id, "the first checkpoint", lambda: one_node.latest_step(save_dir) is not None,
                         timeout=240)
    first_run = two_nodes.output(job_id)
    assert "2 node(s) x 3 process(es)" in first_run and "on 4 model rank(s)" in first_run, two_nodes.diagnostics(job_id)
    two_nodes.run("scancel", "--signal=USR1", "--batch", job_id)

    two_nodes.wait_for(job_id, "the requeue",
                       lambda j: int(j.get("Restarts", 0)) >= 1 and j.get("JobState") == "PENDING", timeout=120)
    stopped_at = one_node.latest_step(save_dir)
    first_run = two_nodes.output(job_id)
    assert stopped_at is not None and stopped_at < total_steps, two_nodes.diagnostics(job_id)
    assert re.search(rf"checkpoint at step {stopped_at} written", first_run), two_nodes.diagnostics(job_id)
    two_nodes.wait_node_idle(timeout=60)
    time.sleep(1.5)  # see test_slurm: a relaunch dated the second of the requeue is refused
    two_nodes.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    job = two_nodes.wait_for(job_id, "the end of the resumed job", lambda j: j.get("JobState") in one_node.FINISHED,
                             timeout=240)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", two_nodes.diagnostics(job_id)
    assert one_node.latest_step(save_dir) == total_steps, two_nodes.diagnostics(job_id)
    second_run = two_nodes.output(job_id)[len(first_run):]
    assert re.search(rf"resuming from \S*step-{stopped_at:08d}, continuing exactly", second_run), (
        two_nodes.diagnostics(job_id))
    assert "head n1 (10.213.7.1:" in second_run  # the rendezvous met at node 1's own address
