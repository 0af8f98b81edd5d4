"""Two nodes for real: two torchrun agents on this machine (`--nnodes 2`, c10d rendezvous on 127.0.0.1), each
running 1 loader + 2 model ranks over gloo, as a two-node SLURM allocation would (ARCHITECTURE §6).

Run A uses the per-node layout (loaders_per_node=1 x models_per_loader=2: {0: [1, 2], 3: [4, 5]}) and checkpoints;
run B resumes it with the same layout written as an explicit global map in the source's style. Together they show
that every loader feeds only the model ranks of its own node, that DDP spans both nodes (the four replicas end
identical), and that a checkpoint taken on two nodes resumes there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.training import train_overrides
from safetensors.torch import load_file

from sd3.data.index import BucketIndex
from sd3.data.sampler import BucketBatchSampler
from sd3.distributed.topology import free_port
from sd3.train.checkpoint import load_checkpoint, resolve_checkpoint

WORKER = Path(__file__).parent / "workers" / "node_rank.py"
PER_RANK_BATCH = 2
FIRST_STEPS, TOTAL_STEPS = 4, 7
NODES = {0: [0, 1, 2], 1: [3, 4, 5]}  # torchrun numbers global ranks node by node
LOADERS = {0: [1, 2], 3: [4, 5]}


def two_node_job(args: list[str], timeout: float = 300) -> list[str]:
    """Start both agents (node_rank 0 and 1) against one c10d rendezvous, wait for both; their outputs."""
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "3", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
             "--rdzv_id", "sd3-two-nodes", "--max_restarts", "0", str(WORKER), "tiny-cpu", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node in (0, 1)
    ]
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=timeout)[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for node, (agent, out) in enumerate(zip(agents, outputs, strict=True)):
        assert agent.returncode == 0, f"node {node} failed:\n{out[-4000:]}"
    return outputs


@pytest.mark.slow
def test_two_nodes_per_node_layout_then_explicit_map_resume(tiny_models, shapes_phase, tmp_path):
    save = tmp_path / "run"
    common = train_overrides(
        tiny_models, shapes_phase, save, "--topology.mode=loader", "--topology.backend=gloo",
        f"--data.batch_size={PER_RANK_BATCH}", "--train.record_rows=true", "--train.ema_update_every=2",
    )
    two_node_job([*common, "--topology.loaders_per_node=1", "--topology.models_per_loader=2",
                  f"--train.total_steps={FIRST_STEPS}", f"--train.save_every={FIRST_STEPS}"])
    first = resolve_checkpoint(save)
    assert first is not None and load_checkpoint(first, map_location="cpu").train_state["train"]["step"] == FIRST_STEPS

    explicit = "{0: [1, 2], 3: [4, 5]}"  # the source's loader_to_model_gpu style, global ranks
    outputs = two_node_job([*common, f"--topology.loader_to_model={explicit}", f"--train.total_steps={TOTAL_STEPS}",
                            f"--train.save_every={TOTAL_STEPS}", "--train.resume=auto"])
    assert f"resuming from {first}" in "".join(outputs)
    final = resolve_checkpoint(save)
    assert final.name == f"step-{TOTAL_STEPS:08d}"

    # Two agents really were two nodes: ranks 0-2 on one, 3-5 on the other, three local ranks each.
    facts = {f["rank"]: f for f in (json.loads(p.read_text()) for p in (save / "nodes").glob("rank*.json"))}
    assert sorted(facts) == list(range(6))
    for ranks in NODES.values():
        assert len({facts[r]["group_rank"] for r in ranks}) == 1
        assert {facts[r]["local_world_size"] for r in ranks} == {3}
    assert facts[0]["group_rank"] != facts[3]["group_rank"]

    # Every loader feeds only its own node's model ranks: model ranks 0, 1 (global 1, 2) train on loader 0's slice of
    # each step, model ranks 2, 3 (global 4, 5) on loader 3's, and the loaders share no row.
    index = BucketIndex.load(shapes_phase.index_path)
    rows_per_loader = (2 * PER_RANK_BATCH, 2 * PER_RANK_BATCH)
    samplers = [BucketBatchSampler(index, 2 * PER_RANK_BATCH, 0, k, 2, 0, loader_rows=rows_per_loader) for k in (0, 1)]
    for loader, consumers in LOADERS.items():
        assert facts[loader]["group_rank"] == {facts[c]["group_rank"] for c in consumers}.pop()
    recorded: dict[int, dict[int, list[int]]] = {}
    for model_rank in range(4):
        lines = (save / "rows" / f"rank{model_rank}.txt").read_text().splitlines()
        recorded[model_rank] = {int(line.split()[0]): [int(v) for v in line.split()[1:]] for line in lines}
        assert sorted(recorded[model_rank]) == list(range(TOTAL_STEPS))  # every step once, across the resume
    for step in range(TOTAL_STEPS):
        for loader_index, model_ranks in enumerate(([0, 1], [2, 3])):
            got = [r for m in model_ranks for r in recorded[m][step]]
            assert set(got) <= set(samplers[loader_index].batch(step).row_ids.tolist()), (step, loader_index)
        assert not set(recorded[0][step] + recorded[1][step]) & set(recorded[2][step] + recorded[3][step])

    # DDP spans both nodes: the four replicas hold the same weights, the ones checkpointed.
    replicas = [load_file(str(save / "weights" / f"model-rank{m}.safetensors")) for m in range(4)]
    saved = load_checkpoint(final, map_location="cpu").model_state
    assert all(torch.equal(rep[k], saved[k]) for rep in replicas for k in saved)
    assert np.isfinite([json.loads(line)["loss"] for line in (save / "metrics.jsonl").read_text().splitlines()]).all()
