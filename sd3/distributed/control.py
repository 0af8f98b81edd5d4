"""The back-channel, model rank -> loader: "stop at step S" or "I am failing", through the job's c10d store.

A point-to-point receive cannot wait on the loader side: gloo only reports completion through a blocking wait
whose timeout would break the connection, and with NCCL a pending receive would block the data sends on the same
stream. The store (created by init_distributed, sd3/distributed/topology.py, and passed in) is polled instead:
each consumer writes its key, then bumps the loader's counter, so one `add(counter, 0)` per poll sees news.
"""

from __future__ import annotations

import torch.distributed as dist

CTRL_STOP, CTRL_FAILED = 1, 2  # message kinds


class ControlChannel:
    """Messages from the consumers of loader rank `loader`, in `store`.

    channel: separates successive sender/receiver pairs of one job (a benchmark runs several).
    """

    def __init__(self, store: dist.Store, loader: int, channel: str = "train"):
        self.store = dist.PrefixStore(f"sd3/control/{channel}/loader{loader}/", store)
        self.seen = 0

    def tell(self, consumer: int, kind: int, step: int, message: str = "") -> None:
        self.store.set(f"consumer{consumer}", f"{kind}:{step}:{message}")
        self.store.add("count", 1)

    def poll(self, consumers: list[int], done: set[int]) -> list[tuple[int, int, int, str]]:
        """New messages as (consumer, kind, step, message), for consumers not in `done`."""
        count = self.store.add("count", 0)
        if count == self.seen:
            return []
        self.seen = count
        news = []
        for c in consumers:
            key = f"consumer{c}"
            if c not in done and self.store.check([key]):
                kind, step, message = self.store.get(key).decode("utf-8", errors="replace").split(":", 2)
                news.append((c, int(kind), int(step), message))
        return news
