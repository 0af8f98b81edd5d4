"""Distribution: rank roles and process groups (topology), Batch transport (transport), the loader-rank loop (loader)."""

from sd3.distributed.topology import Topology, TopologyError, exit_now, init_distributed, shutdown_distributed
from sd3.distributed.transport import BatchReceiver, BatchSender, ConsumerFailed, LoaderFailed, LoaderStats

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
