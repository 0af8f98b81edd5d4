"""The transport's failures, each naming the rank at fault (LoaderFailed, ConsumerFailed)."""

from __future__ import annotations


class LoaderFailed(RuntimeError):
    """A model rank cannot get its next batch: the loader failed, stopped, died or went silent. Names the loader."""


class ConsumerFailed(RuntimeError):
    """A loader cannot reach one of its model ranks (it said so, died, or went silent). Names the model rank."""


class TransportTimeout(RuntimeError):
    """A point-to-point operation did not complete within the timeout."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's text (torch's c10d errors carry a C++ backtrace after it)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
