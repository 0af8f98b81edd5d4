"""Rank roles and process groups, computed in one place (ARCHITECTURE §6).

With `topology.mode = "loader"` some ranks are *loader ranks* (read shards, run the encoders, send Batches) and
the others are *model ranks* (train the MMDiT under DDP on their own process group). The map comes from
`topology.loader_to_model` (the source's `loader_to_model_gpu`: global loader rank -> its model ranks) or is
derived per node from `loaders_per_node` and `models_per_loader`: on every node the first `loaders_per_node`
local ranks load, and each feeds the next `models_per_loader` local ranks in order — the source's default on
8 GPUs per node, `{0: [2, 3, 4], 1: [5, 6, 7]}`, repeated with +8 on every further node.

With `mode = "colocated"` or `"cached"` there are no loader ranks: every rank is a model rank and produces its
own batches, as its own "loader" (`loader_index = model_rank`, `num_loaders = world_size`).

`Topology.resolve` is a pure function (testable without torch.distributed); `init_distributed` reads the
torchrun environment, resolves the roles, initialises the process group and creates the groups.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sd3.config import LOADER_MODES, Config, TopologyConfig
from sd3.distributed.heartbeat import Heartbeat, close_heartbeats
from sd3.distributed.p2p import warm_up
from sd3.errors import ConfigError

# The process group's own timeout (NCCL's watchdog, gloo's collectives) is kept this much longer than the
# transport's, so the transport's message naming the silent rank comes first instead of racing the watchdog's SIGABRT.
PG_TIMEOUT_MARGIN_S = 120.0


def process_group_timeout(transport_s: float) -> datetime.timedelta:
    """The process-group timeout for a transport timeout of `transport_s` seconds."""
    return datetime.timedelta(seconds=transport_s + PG_TIMEOUT_MARGIN_S)


class TopologyError(ConfigError):
    """Roles that do not add up against WORLD_SIZE. One line naming what is wrong."""


@dataclass
class Topology:
    """This rank's role and everything it needs to talk to the others.

    loader_to_model: global loader rank -> global ranks of its model ranks (consumers), in split order.
    model_ranks: every model rank, ascending; DDP runs over them (`model_group`).
    my_loader / consumer_index: for a model rank, its loader's global rank and its slice of that loader's batch.
    consumers: for a loader rank, the global ranks it feeds, in split order.
    loader_index / num_loaders: the sampler's share (a model rank carries its loader's index).
    transport_device: where Batches travel: the GPU with NCCL, the CPU with gloo.
    """

    world_size: int
    rank: int
    role: str  # "loader" | "model"
    mode: str
    loader_to_model: dict[int, list[int]]
    model_ranks: list[int]
    my_loader: int | None
    consumers: list[int]
    loader_index: int
    num_loaders: int
    consumer_index: int = 0
    backend: str = "gloo"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    transport_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = 600.0
    max_in_flight: int = 2
    model_group: dist.ProcessGroup | None = None  # DDP's group (None on loader ranks and in a single process)
    store: dist.Store | None = None  # the job's c10d store (transport back-channel, heartbeats); None in one process
    heartbeat: Heartbeat | None = None  # this rank's heartbeat in `store` (sd3/distributed/heartbeat.py)

    @property
    def is_loader(self) -> bool:
        return self.role == "loader"

    @property
    def is_model(self) -> bool:
        return self.role == "model"

    @property
    def model_rank(self) -> int:
        """Index among model ranks (the DDP rank); -1 on a loader rank."""
        return self.model_ranks.index(self.rank) if self.is_model else -1

    @property
    def num_model_ranks(self) -> int:
        return len(self.model_ranks)

    @property
    def is_main(self) -> bool:
        """The one rank that logs, saves and talks to wandb: the first model rank."""
        return self.rank == self.model_ranks[0]

    @staticmethod
    def resolve(cfg: TopologyConfig, world_size: int, rank: int, local_world_size: int | None = None) -> Topology:
        """Roles of `rank` in a job of `world_size` ranks with `local_world_size` ranks per node (pure)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise TopologyError(f"rank {rank} is outside a world of size {world_size}")
        common = dict(world_size=world_size, rank=rank, mode=cfg.mode, timeout_s=cfg.timeout_minutes * 60.0,
                      max_in_flight=cfg.max_in_flight)
        if cfg.max_in_flight < 1:
            raise TopologyError(f"topology.max_in_flight must be >= 1, got {cfg.max_in_flight}")
        if cfg.timeout_minutes <= 0:
            raise TopologyError(f"topology.timeout_minutes must be > 0, got {cfg.timeout_minutes}")
        if cfg.mode not in LOADER_MODES:  # hybrid: loader ranks as in loader mode, reading data.latent_cache
            return Topology(role="model", loader_to_model={}, model_ranks=list(range(world_size)), my_loader=None,
                            consumers=[], loader_index=rank, num_loaders=world_size, **common)

        if cfg.loader_to_model:
            mapping = _parse_map(cfg.loader_to_model)
            source = f"topology.loader_to_model {_show(mapping)}"
        else:
            mapping = _per_node_map(cfg, world_size, local_world_size or world_size)
            source = (f"topology.loaders_per_node={cfg.loaders_per_node} x models_per_loader={cfg.models_per_loader} "
                      f"per node ({_show(mapping)})")
        _validate(mapping, world_size, source)

        loaders = sorted(mapping)
        model_ranks = sorted(r for consumers in mapping.values() for r in consumers)
        if rank in mapping:
            return Topology(role="loader", loader_to_model=mapping, model_ranks=model_ranks, my_loader=None,
                            consumers=list(mapping[rank]), loader_index=loaders.index(rank), num_loaders=len(loaders),
                            **common)
        my_loader = next(ld for ld, consumers in mapping.items() if rank in consumers)
        return Topology(role="model", loader_to_model=mapping, model_ranks=model_ranks, my_loader=my_loader,
                        consumers=[], loader_index=loaders.index(my_loader), num_loaders=len(loaders),
                        consumer_index=mapping[my_loader].index(rank), **common)


def _show(mapping: dict[int, list[int]]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in mapping.items()) + "}"


def _parse_map(raw: dict[str, list[int]]) -> dict[int, list[int]]:
    mapping: dict[int, list[int]] = {}
    for key, consumers in raw.items():
        try:
            mapping[int(key)] = [int(r) for r in consumers]
        except (TypeError, ValueError):
            raise TopologyError(f"topology.loader_to_model: key '{key}' is not a global rank") from None
    return mapping


def _per_node_map(cfg: TopologyConfig, world_size: int, local_world_size: int) -> dict[int, list[int]]:
    per_node = cfg.loaders_per_node * (1 + cfg.models_per_loader)
    if cfg.loaders_per_node < 1 or cfg.models_per_loader < 1:
        raise TopologyError(f"topology.loaders_per_node ({cfg.loaders_per_node}) and models_per_loader "
                            f"({cfg.models_per_loader}) must both be >= 1")
    if world_size % local_world_size:
        raise TopologyError(f"WORLD_SIZE {world_size} is not a multiple of the ranks per node (LOCAL_WORLD_SIZE "
                            f"{local_world_size}); set topology.loader_to_model explicitly")
    if per_node != local_world_size:
        raise TopologyError(f"topology.loaders_per_node {cfg.loaders_per_node} x (1 + models_per_loader "
                            f"{cfg.models_per_loader}) = {per_node} ranks per node, but each node runs "
                            f"{local_world_size} (LOCAL_WORLD_SIZE); change them or set topology.loader_to_model")
    mapping: dict[int, list[int]] = {}
    for base in range(0, world_size, local_world_size):
        for i in range(cfg.loaders_per_node):
            first = base + cfg.loaders_per_node + i * cfg.models_per_loader
            mapping[base + i] = list(range(first, first + cfg.models_per_loader))
    return mapping


def _validate(mapping: dict[int, list[int]], world_size: int, source: str) -> None:
    """Every rank exactly once, as a loader or as one loader's consumer; each loader feeds someone."""
    if not mapping:
        raise TopologyError(f"{source}: no loader ranks")
    for loader, consumers in mapping.items():
        if not consumers:
            raise TopologyError(f"{source}: loader rank {loader} has no consumers")
    listed = list(mapping) + [r for consumers in mapping.values() for r in consumers]
    out_of_range = sorted({r for r in listed if not 0 <= r < world_size})
    if out_of_range:
        raise TopologyError(f"{source}: rank(s) {out_of_range} out of range for WORLD_SIZE {world_size} "
                            f"(ranks 0..{world_size - 1})")
    duplicates = sorted({r for r in listed if listed.count(r) > 1})
    if duplicates:
        raise TopologyError(f"{source}: rank(s) {duplicates} listed more than once")
    missing = sorted(set(range(world_size)) - set(listed))
    if missing:
        raise TopologyError(f"{source}: rank(s) {missing} of WORLD_SIZE {world_size} have no role "
                            f"(neither a loader nor a consumer)")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise TopologyError(f"environment variable {name}={value!r} is not an integer") from None


def free_port() -> int:
    """A TCP port free on this machine now, for a local rendezvous (torchrun --master-port, a bench or test job)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config) -> Topology:
    """Resolve this rank's role from the torchrun environment, initialise torch.distributed and the groups.

    Without WORLD_SIZE (a plain `sd3 train` in colocated/cached mode) this is a single process: no process
    group is created and `model_group` is None.
    """
    tcfg = cfg.topology
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    topo = Topology.resolve(tcfg, world_size, rank, _env_int("LOCAL_WORLD_SIZE", world_size))

    backend = tcfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise TopologyError("topology.backend 'nccl' needs CUDA, which is not available here; use gloo")
    if torch.cuda.is_available():
        topo.device = torch.device("cuda", local_rank)
        torch.cuda.set_device(topo.device)
    topo.backend = backend
    # gloo moves CPU tensors only; NCCL moves device tensors only.
    topo.transport_device = topo.device if backend == "nccl" else torch.device("cpu")

    if world_size == 1 and topo.mode not in LOADER_MODES:
        return topo
    timeout = process_group_timeout(topo.timeout_s)
    # The store is made here (torchrun's env:// rendezvous, the agent's store under torchrun) and kept, so the
    # transport's back-channel and the heartbeats get it passed instead of reaching into torch for the default one.
    store, rank, world_size = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    store.set_timeout(timeout)
    topo.store = store
    # device_id binds the NCCL communicator to this rank's GPU at once (eager init) instead of at first use.
    device_id = topo.device if backend == "nccl" else None
    dist.init_process_group(backend=backend, store=dist.PrefixStore("default_pg", store), timeout=timeout,
                            world_size=world_size, rank=rank, device_id=device_id)
    if topo.mode in LOADER_MODES:
        # new_group is collective over the default group: every rank calls it, loaders included.
        group = dist.new_group(topo.model_ranks, timeout=timeout)
        topo.model_group = group if topo.is_model else None
        warm_up(rank, topo.loader_to_model, topo.model_group, topo.transport_device)
    else:
        topo.model_group = dist.group.WORLD
    topo.heartbeat = Heartbeat(store, rank)
    return topo


def exit_now(code: int) -> None:
    """End the process with `code` at once, after flushing the logs, skipping interpreter teardown.

    For failure paths: a thread blocked in a gloo wait (the BatchReceiver's, waiting on a loader) makes a normal
    interpreter exit abort with "terminate called without an active exception" while the process group is torn
    down; the exit code would then be 134 instead of `code`.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shutdown_distributed() -> None:
    """Destroy the process group if one was created (safe to call in every mode), after the heartbeats."""
    close_heartbeats()  # marked done: a rank that finished is not a hung one
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
