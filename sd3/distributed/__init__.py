"""Distribution: rank roles and process groups (topology), the Batch transport (wire, control, buffers, receiver,
sender), heartbeats naming a hung rank, stop signals, and the loader-rank loop (loader)."""

from sd3.distributed.errors import ConsumerFailed, LoaderFailed
from sd3.distributed.receiver import BatchReceiver
from sd3.distributed.sender import BatchSender
from sd3.distributed.stats import LoaderStats
from sd3.distributed.topology import Topology, TopologyError, exit_now, init_distributed, shutdown_distributed

__all__ = [
    "BatchReceiver",
    "BatchSender",
    "ConsumerFailed",
    "LoaderFailed",
    "LoaderStats",
    "Topology",
    "TopologyError",
    "exit_now",
    "init_distributed",
    "shutdown_distributed",
]
