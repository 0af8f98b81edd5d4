"""The hung rank is the one named first: a real torchrun job (1 loader + 2 model ranks, gloo) whose model rank 2 is
SIGSTOPped mid-run. The loader's send to it stops completing and the other model rank waits in DDP's all_reduce;
the first failure line any rank prints must name rank 2 (the stalest heartbeat), not the healthy rank it waits on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.training import train_overrides

WORKER = Path(__file__).resolve().parents[1] / "train" / "workers" / "train_rank.py"


@pytest.mark.slow
def test_a_sigstopped_model_rank_is_named_first(tiny_models, shapes_phase, tmp_path):
    save = tmp_path / "run"
    args = train_overrides(
        tiny_models, shapes_phase, save, "--topology.mode=loader", "--topology.backend=gloo",
        "--topology.loaders_per_node=1", "--topology.models_per_loader=2", "--train.total_steps=400",
        "--train.save_every=1000", "--topology.timeout_minutes=0.25",
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", str(WORKER),
           "tiny-cpu", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped = None
    try:
        deadline = time.monotonic() + 120
        metrics = save / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, f"the job ended early:\n{proc.communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, "the job did not reach step 3"
            time.sleep(0.2)
        stopped = int((save / "pids" / "rank2.pid").read_text())
        os.kill(stopped, signal.SIGSTOP)  # hung, not dead: its sockets stay open, its heartbeat stops
        out = proc.communicate(timeout=300)[0]
    finally:
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):  # torchrun may have ended it already
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    named = re.findall(r"rank (\d+) looks hung", out)
    assert named, f"no rank was named as hung:\n{out[-4000:]}"
    assert named[0] == "2", f"the first rank named is {named[0]}, not the stopped rank 2:\n{out[-4000:]}"
    steps = [json.loads(line)["step"] for line in (save / "metrics.jsonl").read_text().splitlines()
             if '"step"' in line]
    assert steps and max(steps) < 400
