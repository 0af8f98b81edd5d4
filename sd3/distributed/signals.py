"""Pre-emption: SIGTERM / SIGUSR1 ask the run to stop at the next step boundary, write one checkpoint and exit 0.

SLURM sends SIGTERM (or the `--signal=USR1@T` of an sbatch script) some time before it kills a job. A handler
that only sets a flag keeps the signal from interrupting a collective or a checkpoint write half way; the
trainer reads the flag once per optimizer step and all model ranks agree on the stop step with one all_reduce
(sd3/train/trainer.py), so the one checkpoint written is the same step everywhere. Loader ranks read the same
flag (`requested()`) and forward it to their consumers.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# Exit code of a run that stopped early because it was asked to: 0, so a SLURM requeue treats it as clean.
PREEMPTED_EXIT_CODE = 0

_requested = threading.Event()
_received: list[str] = []


def _handler(signum: int, frame: object) -> None:
    _received.append(signal.Signals(signum).name)
    _requested.set()


def install() -> dict[int, object]:
    """Route SIGTERM and SIGUSR1 to the stop flag (main thread only, as Python requires).

    Returns the previous handlers, for `restore` when training ran inside a longer-lived process (tests, notebooks).
    """
    return {sig: signal.signal(sig, _handler) for sig in STOP_SIGNALS}


def restore(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """`install` for the duration of a run, then the previous handlers back (`restore`)."""
    previous = install()
    try:
        yield
    finally:
        restore(previous)


def requested() -> bool:
    """True once a stop signal arrived in this process."""
    return _requested.is_set()


def received() -> list[str]:
    """Names of the stop signals received, in order (for the exit message)."""
    return list(_received)


def request() -> None:
    """Ask for a stop as a signal would (used when a peer asks for it, e.g. a loader forwarding its signal)."""
    _requested.set()


def clear() -> None:
    """Forget a previous request (a new run in the same process, e.g. in tests)."""
    _requested.clear()
    _received.clear()
