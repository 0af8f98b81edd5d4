"""A new training stage under SLURM (issue 14 item 3): runjob_SLURM.sh starts it with --train.init_from and always
--train.resume=auto, so the first run starts from stage 1's weights at step 0 and every requeued run resumes the
stage's own checkpoint. --train.resume=PATH is refused: the user's argument would win over the script's `auto` and
every requeue would go back to PATH. The launch-line tests use the fake scontrol/srun of test_scripts.py; the stage
test runs for real on the local one-node cluster, pre-empted with SIGUSR1 and requeued twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.training import train_overrides
from slurm_cluster import REPO, Cluster, local_cluster
from test_scripts import fake_slurm

from sd3.train.checkpoint import load_checkpoint

RUNJOB = REPO / "slurm" / "runjob_SLURM.sh"
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
# One colocated process (no loader ranks) keeps the job small; batch 32 makes a step take ~1 s on this CPU, long
# enough to pre-empt between two checkpoints.
JOB_ENV = {"NPROC_PER_NODE": "1", "SD3_CONFIG": "tiny-cpu"}
TOTAL_STEPS = 10
SAVE_EVERY = 2


def runjob(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NPROC_PER_NODE", "SD3_"))}
    return subprocess.run(["bash", str(RUNJOB), *args], env={**clean, **env}, capture_output=True, text=True,
                          timeout=30)


def launch_line(record: Path) -> list[str]:
    launch = [line for line in record.read_text().splitlines() if "torch.distributed.run" in line]
    assert len(launch) == 1, record.read_text()
    return launch[0].split()


@pytest.mark.parametrize("arg", ["--train.resume=runs/sd3-1b-256", "train.resume=runs/x/step-00000100",
                                 "--train.resume="])
def test_runjob_refuses_resume_path_and_names_init_from(tmp_path: Path, arg: str) -> None:
    record = tmp_path / "srun.log"
    done = runjob(fake_slurm(tmp_path / "bin", record), "--train.lr=5e-5", arg)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and arg in lines[0] and "--train.init_from=" in lines[0] and "requeue" in lines[0], lines
    assert not record.exists()  # refused before srun started anything


def test_runjob_passes_init_from_with_resume_auto(tmp_path: Path) -> None:
    record = tmp_path / "srun.log"
    env = fake_slurm(tmp_path / "bin", record)
    done = runjob(env, "--train.init_from=runs/sd3-1b-256", "--train.resume=auto")
    assert done.returncode == 0, done.stderr
    words = launch_line(record)
    assert words.index("--train.resume=auto") < words.index("--train.init_from=runs/sd3-1b-256")

    # SD3_INIT_FROM does the same; an argument given after the script name still wins (it comes later).
    record.unlink()
    done = runjob(env | {"SD3_INIT_FROM": "runs/stage1"})
    assert done.returncode == 0, done.stderr
    assert "--train.init_from=runs/stage1" in launch_line(record)
    record.unlink()
    done = runjob(env | {"SD3_INIT_FROM": "runs/stage1"}, "--train.init_from=runs/other")
    words = launch_line(record)
    assert words.index("--train.init_from=runs/stage1") < words.index("--train.init_from=runs/other")

    # Without either, no init_from at all.
    record.unlink()
    assert runjob(env).returncode == 0 and not any("init_from" in w for w in launch_line(record))


# ---------------------------------------------------------------------------------------------- on the cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with local_cluster(tmp_path_factory.mktemp("slurm-stage")) as running:
        yield running


def latest_step(save_dir: Path) -> int | None:
    latest = save_dir / "latest"
    if not latest.exists():
        return None
    return int(Path(latest.read_text().strip()).name.removeprefix("step-"))


def wait_for_checkpoint_after(cluster: Cluster, job_id: str, save_dir: Path, after: int, timeout: float) -> int:
    """Poll (5 times a second: a step takes ~1 s) until save_dir has a checkpoint newer than `after`; fail at once
    if the job stops running first."""
    deadline = time.monotonic() + timeout
    next_state_check = 0.0
    while (step := latest_step(save_dir)) is None or step <= after:
        now = time.monotonic()
        if now > next_state_check:
            state = cluster.job(job_id).get("JobState")
            if state not in ("PENDING", "RUNNING", "CONFIGURING"):
                pytest.fail(f"job {job_id} ended ({state}) before a checkpoint after step {after}\n"
                            f"{cluster.diagnostics(job_id)}")
            next_state_check = now + 2.0
        if now > deadline:
            pytest.fail(f"job {job_id}: no checkpoint after step {after} within {timeout:.0f} s\n"
                        f"{cluster.diagnostics(job_id)}")
        time.sleep(0.2)
    return step


def preempt(cluster: Cluster, job_id: str, restarts: int) -> None:
    """SIGUSR1 to the batch shell as SLURM sends it before the time limit; wait until the job is requeued."""
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    cluster.wait_for(job_id, f"requeue {restarts}",
                     lambda j: int(j.get("Restarts", 0)) >= restarts and j.get("JobState") == "PENDING", timeout=90)


def release(cluster: Cluster, job_id: str) -> None:
    """Start the requeued job now instead of after SLURM's ~120 s hold."""
    # slurmd refuses a relaunch dated the same second as the requeue revoked the old credential (see test_slurm.py).
    cluster.wait_node_idle(timeout=60)
    time.sleep(1.5)
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


def steps_logged(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"(?<!\w)step (\d+) loss=", text)]


@pytest.mark.slurm
@pytest.mark.slow
def test_stage_job_requeued_twice_resumes_its_own_checkpoints(cluster: Cluster, tiny_checkpoint: Path, tiny_models,
                                                              shapes_phase, tmp_path: Path) -> None:
    stage_one = tiny_checkpoint.parent  # stage 1's save_dir (4 colocated steps, in process); its latest is step 4
    save_dir = tmp_path / "stage2"
    args = train_overrides(tiny_models, shapes_phase, save_dir, "--topology.mode=colocated", "--data.batch_size=32",
                           f"--train.total_steps={TOTAL_STEPS}", f"--train.save_every={SAVE_EVERY}",
                           f"--train.init_from={stage_one}")
    job_id = cluster.submit(RUNJOB, ["--gres=none", "--time=10:00", f"--chdir={tmp_path}"], args,
                            {**JOB_ENV, "SD3_PYTHON": sys.executable}, tmp_path / "job-%j.out")

    # Run 1: a new stage from stage 1's weights at step 0; pre-empted after its first checkpoint of its own.
    wait_for_checkpoint_after(cluster, job_id, save_dir, 0, timeout=180)
    preempt(cluster, job_id, restarts=1)
    stop_1 = latest_step(save_dir)
    run_1 = cluster.output(job_id)
    stage_run_id = load_checkpoint(save_dir / f"step-{stop_1:08d}", map_location="cpu").meta["wandb_run_id"]
    release(cluster, job_id)
    assert f"resuming from {tiny_checkpoint}, weights and EMA only (reset_optim): new stage from step 0" in run_1, (
        cluster.diagnostics(job_id))
    assert stop_1 is not None and stop_1 < TOTAL_STEPS, f"stopped at {stop_1}\n{cluster.diagnostics(job_id)}"
    assert re.search(rf"stop requested \([^)]*SIGUSR1[^)]*\): checkpoint at step {stop_1} written", run_1), (
        cluster.diagnostics(job_id))
    assert steps_logged(run_1)[0] == 1 and steps_logged(run_1)[-1] == stop_1, steps_logged(run_1)

    # Run 2: init_from is still on the command line, but the save_dir has its own checkpoint: resume it exactly.
    wait_for_checkpoint_after(cluster, job_id, save_dir, stop_1, timeout=180)
    preempt(cluster, job_id, restarts=2)
    stop_2 = latest_step(save_dir)
    run_2 = cluster.output(job_id)[len(run_1):]  # the log is appended to across requeues
    release(cluster, job_id)
    assert f"resuming from {save_dir / f'step-{stop_1:08d}'}, continuing exactly" in run_2, cluster.diagnostics(job_id)
    assert f"resuming from {tiny_checkpoint}" not in run_2
    assert stop_2 is not None and stop_1 < stop_2 < TOTAL_STEPS, f"{stop_1} -> {stop_2}\n{cluster.diagnostics(job_id)}"
    assert steps_logged(run_2)[0] == stop_1 + 1 and steps_logged(run_2)[-1] == stop_2, steps_logged(run_2)

    # Run 3: resumes the second stop and finishes the stage.
    job = cluster.wait_for(job_id, "the end of the job", lambda j: j.get("JobState") in FINISHED, timeout=180)
    run_3 = cluster.output(job_id)[len(run_1) + len(run_2):]
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "2", (
        cluster.diagnostics(job_id))
    assert f"resuming from {save_dir / f'step-{stop_2:08d}'}, continuing exactly" in run_3, cluster.diagnostics(job_id)
    assert steps_logged(run_3)[0] == stop_2 + 1 and steps_logged(run_3)[-1] == TOTAL_STEPS, steps_logged(run_3)
    assert latest_step(save_dir) == TOTAL_STEPS

    # The stage's own counters went on across both requeues: TOTAL_STEPS AdamW steps since init_from (not stage 1's
    # 4 + ...), one wandb run for the whole stage, a new one from stage 1's.
    final = load_checkpoint(save_dir / f"step-{TOTAL_STEPS:08d}", map_location="cpu")
    assert {float(v["step"]) for v in final.train_state["optimizer"]["state"].values()} == {float(TOTAL_STEPS)}
    assert final.meta["wandb_run_id"] == stage_run_id
    assert final.meta["wandb_run_id"] != load_checkpoint(tiny_checkpoint, map_location="cpu").meta["wandb_run_id"]
