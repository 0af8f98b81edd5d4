"""Worker of the crash test: a colocated training run that SIGKILLs itself in the middle of writing its
second checkpoint (after some bytes of state.pt are on disk), as a pre-emption without warning would.

Usage: python tests/train/workers/crash_in_save.py PRESET --section.key=value ...
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from sd3.commands.train import run
from sd3.config_loader import load_config

real_save = torch.save
calls = {"n": 0}


def save_then_die(obj, f, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] < 2:
        return real_save(obj, f, *args, **kwargs)
    partial = f if hasattr(f, "write") else open(f, "wb")
    partial.write(b"PK\x03\x04 partial")  # the start of a zip archive, then the process is gone
    partial.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    torch.save = save_then_die
    sys.exit(run(load_config(sys.argv[1], sys.argv[2:])))
