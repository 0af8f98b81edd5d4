"""Run several 3-rank jobs of transport_job.py at once, each rank a forked process with its own env:// settings.

`python fork_jobs.py OUT_DIR SCENARIO...` writes OUT_DIR/SCENARIO/rank-R.json (the worker's report),
rank-R.err (its stderr) and OUT_DIR/summary.json: per scenario and rank, the exit code (negative: killed by
that signal; null: still running when the launcher gave up and killed it) and seconds until it exited.

Ranks are separate processes, as on separate nodes, rather than torchrun workers: torchrun ends the whole job
as soon as one worker fails, which would hide whether the other ranks notice the failure by themselves.
torch and sd3 are imported once here, before forking, so each job costs no start-up time.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import transport_job  # imports torch, torch.distributed and sd3.distributed before any fork

from sd3.distributed.topology import free_port

STEPS = 12
TIMEOUT_S = 60.0  # the bound: every rank out within 60 s
GRACE_S = 3.0  # a rank still running this long after the model ranks ended is killed (the hung loader)


def start_rank(scenario: str, rank: int, port: int, out_dir: Path) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        err = os.open(out_dir / f"rank-{rank}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(err, 2)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="3", RANK=str(rank),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="3")
        code = transport_job.run(scenario, STEPS, out_dir)
    except BaseException as e:  # noqa: BLE001 - report anything, the parent only sees the code
        print(f"rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        sys.stderr.flush()
        os._exit(code)


def main() -> int:
    out_root, scenarios = Path(sys.argv[1]), sys.argv[2:]
    procs: dict[int, tuple[str, int]] = {}
    start = time.perf_counter()
    for scenario in scenarios:
        out_dir = out_root / scenario
        out_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        for rank in range(3):
            procs[start_rank(scenario, rank, port, out_dir)] = (scenario, rank)
    summary: dict[str, dict[str, dict]] = {s: {} for s in scenarios}
    models_done_at: dict[str, float] = {}
    while sum(len(s) for s in summary.values()) < len(procs):
        now = time.perf_counter() - start
        for pid, (scenario, rank) in procs.items():
            if str(rank) in summary[scenario]:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                summary[scenario][str(rank)] = {"returncode": code, "elapsed": now}
            elif now > TIMEOUT_S or now > models_done_at.get(scenario, 1e9) + GRACE_S:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                summary[scenario][str(rank)] = {"returncode": None, "elapsed": now}
        for scenario, ranks in summary.items():
            if scenario not in models_done_at and "1" in ranks and "2" in ranks:
                models_done_at[scenario] = now
        time.sleep(0.05)
    (out_root / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
