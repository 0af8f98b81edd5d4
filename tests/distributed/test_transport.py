"""sd3.distributed over real gloo: 1 loader rank feeding 2 model ranks, under torchrun and as separate processes.

Workers: workers/transport_job.py (one rank; the loader runs the real serve loop with a stand-in producer of
random Batches whose bucket shapes change every step) and workers/fork_jobs.py (several such jobs at once, each
rank its own process, so every rank's own reaction to a failure is visible; torchrun would kill them first).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sd3.distributed.topology import free_port

WORKERS = Path(__file__).parent / "workers"
STEPS = 12


def job_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def torchrun(scenario: str, out_dir: Path) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "3",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}",
           str(WORKERS / "transport_job.py"), scenario, str(STEPS), str(out_dir)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=120)
    return done, time.perf_counter() - start


def report(out_dir: Path, rank: int) -> dict | None:
    path = out_dir / f"rank-{rank}.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_torchrun_stream_exact_shapes_in_flight_bound_prefetch_and_stop(tmp_path):
    done, _ = torchrun("ok", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    loader, *models = (report(tmp_path, r) for r in range(3))
    assert loader["rc"] == 0
    # The window filled (the loader ran ahead of the slow model ranks) but never overflowed.
    assert loader["max_in_flight_seen"] == 2
    for m in models:
        # Every step arrived, in order, each tensor checked equal (shape, dtype, values) inside the worker.
        assert [s["step"] for s in m["seen"]] == list(range(STEPS))
        # The next batch was fully received while the model rank "computed" on the current one.
        assert m["prefetched"] >= STEPS - 2
    # Shapes follow the buckets step by step (no padding to the largest), and the two slices partition the batch.
    shapes = {tuple(s["latents"][2:]) for s in models[0]["seen"]}
    assert shapes == {(8, 8), (4, 12), (12, 4), (6, 6), (160, 160)}  # (160, 160): > 1 MB per slice
    for a, b in zip(models[0]["seen"], models[1]["seen"], strict=True):
        rows_a, rows_b = a["rows"], b["rows"]
        assert not set(rows_a) & set(rows_b)
        assert sorted(rows_a + rows_b) == list(range(100 * a["step"], 100 * a["step"] + len(rows_a) + len(rows_b)))
    assert any(len(s["rows"]) == 0 for s in models[1]["seen"])  # an empty slice still arrives, shaped
    # SIGUSR1 on the loader at step 6: every later header says so, and the loader kept serving to the end.
    assert [m["first_flagged"] for m in models] == [6, 6]


def test_torchrun_loader_exception_stops_the_job_naming_it(tmp_path):
    done, elapsed = torchrun("loader_error", tmp_path)
    assert done.returncode != 0
    assert elapsed < 60 + 30  # the job's own exit is immediate; the slack is start-up on a loaded machine
    assert "loader rank 0 failed at step 3: RuntimeError: boom in the stand-in producer" in done.stderr


@pytest.fixture(scope="module")
def failures(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("failures")
    scenarios = ["loader_error", "loader_start_error", "loader_kill", "loader_hang", "model_fail", "model_kill",
                 "stop_lost"]
    subprocess.run([sys.executable, str(WORKERS / "fork_jobs.py"), str(out), *scenarios], env=job_env(), check=True,
                   timeout=150, cwd=WORKERS)
    return out, json.loads((out / "summary.json").read_text())


def ranks(failures, scenario):
    out, summary = failures
    return [(summary[scenario][str(r)], report(out / scenario, r)) for r in range(3)]


def test_loader_exception_every_rank_exits_non_zero_naming_it(failures):
    (loader, _), *models = ranks(failures, "loader_error")
    assert loader["returncode"] == 1
    for status, rep in models:
        assert status["returncode"] == 3 and status["elapsed"] < 60
        assert rep["message"] == "loader rank 0 failed at step 3: RuntimeError: boom in the stand-in producer"
        assert [s["step"] for s in rep["seen"]] == [0, 1, 2]  # everything sent before the failure was delivered


def test_loader_that_cannot_start_tells_its_consumers(failures):
    (loader, _), *models = ranks(failures, "loader_start_error")
    assert loader["returncode"] == 1
    for status, rep in models:
        assert status["returncode"] == 3 and rep["seen"] == []
        assert rep["message"].startswith("loader rank 0 failed at step 0: FileNotFoundError: bucket index ")
        assert "run `sd3 create-indices` first" in rep["message"]


def test_killed_loader_is_named_by_every_model_rank(failures):
    (loader, _), *models = ranks(failures, "loader_kill")
    assert loader["returncode"] == -9
    for status, rep in models:
        assert status["returncode"] not in (0, None) and status["elapsed"] < 60
        assert rep["cause"].startswith("lost loader rank 0 while receiving")


def test_hung_loader_is_caught_by_the_configured_timeout(failures):
    (loader, _), *models = ranks(failures, "loader_hang")
    assert loader["returncode"] is None  # still asleep; the launcher killed it afterwards
    for status, rep in models:
        assert status["returncode"] == 3
        assert 6 <= status["elapsed"] < 60  # timeout_minutes = 0.1
        assert rep["message"] == ("no header of step 3 from loader rank 0 within 0.1 min (topology.timeout_minutes): "
                                  "is it hung?")


@pytest.mark.parametrize("scenario", ["model_fail", "model_kill"])
def test_a_failed_or_dead_model_rank_stops_its_loader(failures, scenario):
    out, _ = failures
    (loader, _), (other, _), (failed, _) = ranks(failures, scenario)
    assert failed["returncode"] == (4 if scenario == "model_fail" else -9)
    assert loader["returncode"] == 1 and loader["elapsed"] < 60
    assert other["returncode"] not in (0, None) and other["elapsed"] < 60
    assert "model rank 2" in (out / scenario / "rank-0.err").read_text()


def test_stop_reports_a_loader_that_vanished_instead_of_acknowledging(failures):
    (loader, _), *models = ranks(failures, "stop_lost")
    assert loader["returncode"] == -9
    for status, rep in models:
        assert status["returncode"] == 3
        assert rep["message"].startswith("lost loader rank 0 while receiving")
