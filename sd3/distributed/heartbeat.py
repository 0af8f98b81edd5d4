"""Per-rank heartbeats in the job's store, so that whoever times out names the hung rank first (issue 14 item 5).

When one model rank stops (SIGSTOP, a stuck kernel, a dead node), the first timeout fires elsewhere: its DDP peers
wait in an all_reduce and stop taking batches, so the loader's "model rank 1 has not taken step 6" names a healthy
rank. Every rank therefore runs a small thread that writes `wall time:step` under its own key every `interval_s`;
a process that is stopped or gone stops writing, while one merely blocked in a collective keeps writing. A rank
that times out reads every heartbeat and puts the stalest one (older than STALE_S) in front of its message.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

log = logging.getLogger(__name__)

INTERVAL_S = 1.0  # seconds between beats
STALE_S = 5.0  # a heartbeat older than this (5 missed beats) means the process is not running


def _key(rank: int) -> str:
    return f"sd3/heartbeat/rank{rank}"


@dataclass
class Beat:
    rank: int
    age_s: float  # seconds since the rank last wrote (0 once it marked itself done)
    step: int  # the last step it reported (-1: none)


DONE = "done"  # the stamp of a rank that closed its heartbeat: finished, not hung

_running: list[Heartbeat] = []


class Heartbeat:
    """This rank's heartbeat thread. `progress(step)` records how far it got; the thread publishes it."""

    def __init__(self, store: dist.Store, rank: int, interval_s: float = INTERVAL_S):
        self.store, self.rank, self.interval_s = store, rank, interval_s
        self.step = -1
        self._stop = threading.Event()
        self._write()
        self._thread = threading.Thread(target=self._run, name=f"sd3-heartbeat-{rank}", daemon=True)
        self._thread.start()
        _running.append(self)

    def progress(self, step: int) -> None:
        self.step = step  # an int assignment: the thread reads it at its next beat

    def _write(self) -> None:
        self.store.set(_key(self.rank), f"{time.time():.3f}:{self.step}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._write()
            except Exception as e:  # the store went with the rank that hosted it: nothing left to tell
                log.debug("heartbeat of rank %d stops: %s", self.rank, e)
                return

    def close(self) -> None:
        """Stop beating and mark this rank done (best effort: the store may be gone)."""
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s)
        try:
            self.store.set(_key(self.rank), f"{DONE}:{self.step}")
        except Exception as e:
            log.debug("could not mark rank %d's heartbeat done: %s", self.rank, e)
        if self in _running:
            _running.remove(self)


def close_heartbeats() -> None:
    """Close every heartbeat of this process (at shutdown)."""
    for beat in list(_running):
        beat.close()


def read_beats(store: dist.Store, ranks: list[int], now: float | None = None) -> list[Beat]:
    """The last beat of every rank that has one, stalest first (then the one furthest behind). Never blocks."""
    now = time.time() if now is None else now
    beats = []
    for r in ranks:
        if not store.check([_key(r)]):
            continue  # no heartbeat at all (a process without init_distributed's, e.g. a test): nothing to judge
        stamp, step = store.get(_key(r)).decode().split(":")
        age = 0.0 if stamp == DONE else max(now - float(stamp), 0.0)
        beats.append(Beat(r, age, int(step)))
    return sorted(beats, key=lambda b: (-b.age_s, b.step, b.rank))


def stalest(store: dist.Store | None, ranks: list[int], exclude: int | None = None,
            stale_s: float = STALE_S) -> Beat | None:
    """The rank (other than `exclude`) whose heartbeat stopped longest ago, if any stopped; None otherwise."""
    if store is None:
        return None
    try:
        beats = read_beats(store, [r for r in ranks if r != exclude])
    except Exception:  # the store is gone: nothing to name
        return None
    return beats[0] if beats and beats[0].age_s > stale_s else None


def name_hung_first(store: dist.Store | None, ranks: list[int], message: str, me: int | None = None) -> str:
    """`message`, preceded by the rank whose heartbeat stopped (the likely cause), when there is one."""
    beat = stalest(store, ranks, exclude=me)
    if beat is None:
        return message
    return f"rank {beat.rank} looks hung (no heartbeat for {beat.age_s:.0f} s, last at step {beat.step}); {message}"
