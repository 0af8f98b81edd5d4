"""Test-wide environment: no hub access, no wandb network, deterministic CPU threads."""

import os

# A hub id without HF_HUB_OFFLINE retries for ~45 s before failing; with a key and no network, wandb.init hangs.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Session fixtures shared by several test packages (tiny encoders, shapes data, a tiny checkpoint) live in
# tests/fixtures/, one file per producer; importing them here registers them with pytest.
from fixtures.data import *  # noqa: E402,F401,F403
from fixtures.encoders import *  # noqa: E402,F401,F403
from fixtures.training import *  # noqa: E402,F401,F403
