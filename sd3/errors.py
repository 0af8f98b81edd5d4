"""The user-error types, and the one line the cli prints for an error the user can fix.

A *user error* (a bad path, a corrupt or unsafe file, a bad value, a backend this machine cannot run) is printed
as one line on stderr naming the culprit and exits 2; anything else is an internal failure and keeps its
traceback (exit 1). Every module may raise these: this file imports nothing of sd3, so it sits before the data
package in the import order (data -> encoders -> distributed -> train -> sample -> commands/bench -> cli).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import TypeVar

from safetensors import SafetensorError

T = TypeVar("T")


class UserError(Exception):
    """A mistake the user can fix. The message is one line and names the culprit (key, path, value)."""


class ConfigError(UserError, ValueError):
    """A bad preset, key or value in a config or an override."""


class UnavailableError(UserError, RuntimeError):
    """A valid setting that cannot run on this machine (e.g. model.attention_backend=flash without CUDA)."""


class CheckpointError(UserError):
    """A checkpoint or weights file that cannot be read: missing, truncated, corrupt or not plain tensors."""


def first_line(text: object) -> str:
    """The first non-empty line of a message (torch and safetensors write several)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _refusal(e: pickle.UnpicklingError) -> str:
    """What torch.load(weights_only=True) refused, from its several-paragraph message (the line naming the GLOBAL
    or opcode, e.g. 'Trying to load unsupported GLOBAL posix.system ...'); its first line is boilerplate."""
    detail = [line.strip() for line in str(e).splitlines() if "unsupported" in line.lower()]
    return detail[0] if detail else first_line(e)


def read_file(path: str | os.PathLike, reader: Callable[..., T], **kwargs) -> T:
    """`reader(path, **kwargs)` (safetensors' load_file, torch.load ...), with the errors of a corrupt or unsafe file
    turned into a CheckpointError that names it: the libraries' own messages do not say which file."""
    try:
        return reader(path, **kwargs)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({first_line(e)})") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} is not a plain-tensor checkpoint: torch.load(weights_only=True) refuses "
                              f"to unpickle it ({_refusal(e)})") from None
    except (EOFError, RuntimeError) as e:  # torch.load of a truncated or non-zip file
        raise CheckpointError(f"{path}: truncated or not a torch checkpoint ({first_line(e)})") from None


def user_error_line(e: BaseException) -> str | None:
    """The one-line message of a user error, or None when `e` is an internal failure.

    Besides our own types, the exceptions libraries raise for bad input are user errors too: a file that is not
    there (OSError with a file name: FileNotFoundError, NotADirectoryError, PermissionError ...), a .safetensors
    file whose header cannot be parsed, a pickle that torch.load(weights_only=True) refuses to run.
    """
    if isinstance(e, UserError):
        return first_line(e)
    if isinstance(e, SafetensorError):
        return f"not a readable .safetensors file ({first_line(e)})"
    if isinstance(e, pickle.UnpicklingError):
        return f"not a plain-tensor checkpoint: torch.load(weights_only=True) refuses to unpickle it ({_refusal(e)})"
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        # Raised by open() they carry the path; raised by our code the message names it.
        return f"{e.filename}: {e.strerror}" if e.filename is not None and e.strerror else first_line(e)
    return None
