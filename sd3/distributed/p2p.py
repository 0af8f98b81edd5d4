"""Point-to-point plumbing shared by sender and receiver: waiting on a Work with a deadline, warming up the pairs.

gloo completes an isend only once the receiver has posted the matching receive, and NCCL's send kernel does not
finish before the peer's receive runs, so a Work that has not completed is exactly "not yet taken by the peer".
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from sd3.distributed.errors import TransportTimeout
from sd3.distributed.wire import DATA_TAG


def wait_work(work: dist.Work, timeout_s: float) -> None:
    """Block until `work` completes, at most `timeout_s`: TransportTimeout, or RuntimeError if the peer is gone.

    `Work.wait(timeout)` blocks the calling thread (no polling of ours) with gloo and NCCL alike: with a timeout,
    NCCL's wait waits on the host for the kernel instead of only ordering the current stream after it, and raises
    once the timeout passes. gloo closes the connection after a timed-out wait, so each Work is waited once.
    """
    try:
        work.wait(datetime.timedelta(seconds=max(timeout_s, 0.001)))
    except RuntimeError as e:
        if "imed out" in str(e):  # gloo: "Timed out waiting ...", NCCL: "... timed out in blocking wait"
            raise TransportTimeout(f"timed out after {timeout_s:g} s") from None
        raise


def warm_up(rank: int, loader_to_model: dict[int, list[int]], model_group: dist.ProcessGroup | None,
            device: torch.device) -> None:
    """Create every communicator this rank will use, from the calling (main) thread, before any other thread runs.

    NCCL makes a communicator lazily at a group's first collective and a pair's first send/recv, and documents
    creating them from two threads at once as unsafe; left alone, the BatchReceiver's thread (first irecv) and the
    main thread (DDP's first broadcast) would race. So: one all_reduce on the model ranks' group, then one blocking
    send/recv per (loader, consumer) pair, loaders sending to their consumers in order (no cycle: a consumer's only
    other call here is the all_reduce, which every model rank reaches).
    """
    probe = torch.zeros(1, device=device)
    if model_group is not None:
        dist.all_reduce(probe, group=model_group)
    if rank in loader_to_model:
        for consumer in loader_to_model[rank]:
            dist.send(probe, dst=consumer, tag=DATA_TAG)
        return
    for loader, consumers in loader_to_model.items():
        if rank in consumers:
            dist.recv(probe, src=loader, tag=DATA_TAG)
