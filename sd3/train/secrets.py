"""Secret scrubbing: no credential from the environment or .env ever reaches a config.json, meta.json or log.

Tokens live in the environment only (HF_TOKEN, WANDB_API_KEY, loaded from .env); a Config holds none by design.
This is the belt to those braces: whatever tree is about to be written is scrubbed first.
"""

from __future__ import annotations

import os
import re
from typing import Any

SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
_SECRET_KEY_PARTS = {"token", "secret", "secrets", "password", "passwd", "apikey", "key", "auth", "credential"}
# Hugging Face user tokens, in case one arrives under an innocent key name. (A 40-hex wandb key cannot be told
# from a git commit id by its shape; it is caught by its key name or by $WANDB_API_KEY.)
_SECRET_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")


def _looks_secret(key: str | None, value: str) -> bool:
    if not value:
        return False
    if key is not None and _SECRET_KEY_PARTS & set(re.split(r"[^a-z0-9]+", key.lower())):
        return True
    for var in SECRET_ENV_VARS:
        secret = os.environ.get(var, "")
        if len(secret) >= 8 and secret in value:
            return True
    return bool(_SECRET_VALUE.search(value))


def scrub_secrets(tree: Any, path: str = "") -> tuple[Any, list[str]]:
    """A copy of a JSON-like tree without string values that look like credentials, and the removed paths.

    Removed: strings under a key whose name has a part token / key / secret / password / auth (e.g.
    `hf_token`, `wandb_api_key`; `text_tokens` is not such a part and numbers are never removed), strings that
    contain the value of $HF_TOKEN / $HUGGING_FACE_HUB_TOKEN / $WANDB_API_KEY, and strings shaped like a
    Hugging Face token or a wandb key. Only the paths are reported, never the values.
    """
    removed: list[str] = []

    def walk(node: Any, key: str | None, where: str) -> tuple[bool, Any]:
        if isinstance(node, str):
            if _looks_secret(key, node):
                removed.append(where or "<root>")
                return False, None
            return True, node
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                keep, v2 = walk(v, str(k), f"{where}.{k}" if where else str(k))
                if keep:
                    out[k] = v2
            return True, out
        if isinstance(node, (list, tuple)):
            out_list = []
            for i, v in enumerate(node):
                keep, v2 = walk(v, key, f"{where}[{i}]")
                if keep:
                    out_list.append(v2)
            return True, out_list
        return True, node

    keep, clean = walk(tree, None, path)
    return (clean if keep else None), removed


