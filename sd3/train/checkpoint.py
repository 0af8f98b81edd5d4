"""Checkpoint directories: written atomically, loadable without pickle, free of secrets (ARCHITECTURE §7).

Layout::

    <save_dir>/step-00012000/model.safetensors   model weights, keys as in model.state_dict()
                            /ema.safetensors     fp32 EMA weights, same keys
                            /state.pt            optimizer, scheduler, scaler, RNG and sampler states, counters:
                                                 tensors, numbers, strings, lists, dicts only, so that
                                                 torch.load(weights_only=True) reads it
                            /config.json         the resolved Config.to_dict(), secrets scrubbed
                            /meta.json           step, wandb run id, ...
    <save_dir>/latest                            text file naming the newest step directory, written last

A save writes everything into `<save_dir>/.tmp-step-XXXXXXXX-<pid>`, fsyncs the files and the directory,
renames it to `step-XXXXXXXX` (atomic on POSIX), then replaces `latest` the same way. A crash at any point
leaves either the previous checkpoint as `latest` or a complete new one; temporary directories of dead
processes are removed by the next save.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sd3.errors import read_file

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
REQUIRED_FILES = (MODEL_FILE, EMA_FILE, STATE_FILE, CONFIG_FILE, META_FILE)
LATEST = "latest"
TMP_PREFIX = ".tmp-"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
TMP_ENTRY = re.compile(r"^\.tmp-.*-(\d+)$")


class Loaded(NamedTuple):
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]
    config_dict: dict[str, Any]
    meta: dict[str, Any]


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------- validation


# Exact types: numpy's float64 subclasses float but is pickled as a numpy scalar, which weights_only refuses.
_LEAF_TYPES = (bool, int, float, str, type(None))
_DICT_TYPES = (dict, OrderedDict)
_SEQUENCE_TYPES = (list, tuple, torch.Size)


def check_weights_only(obj: Any, path: str = "train_state") -> None:
    """Raise TypeError naming the first value torch.load(weights_only=True) could not read back.

    Allowed: tensors, numbers, strings, None, and lists / tuples / dicts (str or int keys) of those. numpy
    arrays and arbitrary objects are refused here rather than discovered on resume.
    """
    if isinstance(obj, torch.Tensor) or type(obj) in _LEAF_TYPES:
        return
    if type(obj) in _DICT_TYPES:
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{path}: dict key {k!r} of type {type(k).__name__} is not weights_only-safe")
            check_weights_only(v, f"{path}[{k!r}]")
        return
    if type(obj) in _SEQUENCE_TYPES:
        for i, v in enumerate(obj):
            check_weights_only(v, f"{path}[{i}]")
        return
    raise TypeError(f"{path}: {type(obj).__module__}.{type(obj).__name__} is not weights_only-safe "
                    "(use tensors, numbers, strings, lists, dicts)")


# ------------------------------------------------------------------------------------------------- secrets

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


# ---------------------------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU, every CUDA device, numpy, python `random`) in weights_only-safe form."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),  # uint8 tensor
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),  # uint32 values, stored widened
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state. CUDA states are restored for the devices present (a resume on a machine
    with another GPU count keeps the common ones)."""
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda", [])
    if cuda_states and torch.cuda.is_available():
        n = min(len(cuda_states), torch.cuda.device_count())
        for device in range(n):
            torch.cuda.set_rng_state(cuda_states[device], device)
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )


# ----------------------------------------------------------------------------------------------- file I/O


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safetensors_ready(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and one storage per key: safetensors refuses tensors that share memory (tied weights)
    and views into a larger storage, so those are copied. Keys stay exactly as in the state_dict."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"weights['{key}'] is a {type(value).__name__}, not a tensor")
        t = value.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _write_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    save_file(_safetensors_ready(state), str(path), metadata={"format": "pt"})
    _fsync_path(path)


@contextlib.contextmanager
def _durable(path: Path, mode: str) -> Iterator[IO]:
    """open(path, mode) whose contents are on disk (flushed and fsynced) when the block ends."""
    with open(path, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def _write_state(path: Path, train_state: dict[str, Any]) -> None:
    with _durable(path, "wb") as f:
        torch.save(train_state, f)


def _write_json(path: Path, obj: Any) -> None:
    with _durable(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_latest(save_dir: Path, name: str) -> None:
    tmp = save_dir / f"{TMP_PREFIX}latest-{os.getpid()}"
    with _durable(tmp, "w") as f:
        f.write(name + "\n")
    os.replace(tmp, save_dir / LATEST)
    _fsync_path(save_dir)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_temporaries(save_dir: Path) -> list[Path]:
    """Remove `.tmp-*-<pid>` entries left by crashed saves (of dead processes, or our own) and return them."""
    removed = []
    if not save_dir.is_dir():
        return removed
    for entry in save_dir.iterdir():
        m = TMP_ENTRY.match(entry.name)
        if m and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            _remove(entry)
            removed.append(entry)
    if removed:
        log.info("removed %d unfinished checkpoint temporaries in %s", len(removed), save_dir)
    return removed


# ----------------------------------------------------------------------------------------------- save


def save_checkpoint(
    save_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    config_dict: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write `<save_dir>/step-<8 digits>/` atomically, point `latest` at it, keep the newest `keep_last`.

    keep_last < 1 keeps every checkpoint. The directory `latest` names is never pruned. A checkpoint of the same
    step is replaced. Returns the final directory.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    clean_temporaries(save_dir)
    check_weights_only(train_state)
    config_clean, removed = scrub_secrets(config_dict)
    meta_clean, removed_meta = scrub_secrets({**meta, "step": int(step)})
    for where in removed + [f"meta.{p}" for p in removed_meta]:
        log.warning("checkpoint: dropped '%s' from the saved config: it looks like a secret", where)

    name = step_dir_name(step)
    final = save_dir / name
    tmp = save_dir / f"{TMP_PREFIX}{name}-{os.getpid()}"
    try:
        tmp.mkdir()
        _write_weights(tmp / MODEL_FILE, model_state)
        _write_weights(tmp / EMA_FILE, ema_state)
        _write_state(tmp / STATE_FILE, train_state)
        _write_json(tmp / CONFIG_FILE, config_clean)
        _write_json(tmp / META_FILE, meta_clean)
        _fsync_path(tmp)
    except BaseException:
        _remove(tmp)
        raise

    if final.exists():
        trash = save_dir / f"{TMP_PREFIX}trash-{name}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        _remove(trash)
    else:
        os.rename(tmp, final)
    _fsync_path(save_dir)
    _write_latest(save_dir, name)
    _prune(save_dir, keep_last, keep=name)
    return final


def _complete_step_dirs(save_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of the complete checkpoints in save_dir, oldest first."""
    found = []
    for entry in save_dir.iterdir() if save_dir.is_dir() else []:
        m = STEP_DIR.match(entry.name)
        if m and entry.is_dir() and not missing_files(entry):
            found.append((int(m.group(1)), entry))
    return sorted(found)


def _prune(save_dir: Path, keep_last: int, keep: str) -> None:
    if keep_last < 1:
        return
    dirs = _complete_step_dirs(save_dir)
    for _, path in dirs[:-keep_last]:
        if path.name == keep:
            continue
        # Rename first: a crash during rmtree leaves a temporary, not a half-deleted step directory.
        trash = save_dir / f"{TMP_PREFIX}trash-{path.name}-{os.getpid()}"
        os.rename(path, trash)
        _remove(trash)


# ----------------------------------------------------------------------------------------------- resolve / load


def missing_files(path: Path) -> list[str]:
    return [f for f in REQUIRED_FILES if not (path / f).is_file()]


def require_complete(path: Path) -> None:
    """A one-line FileNotFoundError naming the first file a checkpoint directory lacks."""
    missing = missing_files(path)
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {missing[0]}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _newest(save_dir: Path) -> Path | None:
    """The directory `latest` names if complete, else the newest complete step directory, else None."""
    latest = save_dir / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        candidate = save_dir / name
        if STEP_DIR.match(name) and candidate.is_dir() and not missing_files(candidate):
            return candidate
        log.warning("%s names '%s', which is not a complete checkpoint; using the newest complete one", latest, name)
    dirs = _complete_step_dirs(save_dir)
    return dirs[-1][1] if dirs else None


def resolve_checkpoint(spec: str | Path | None, save_dir: str | Path | None = None) -> Path | None:
    """Which checkpoint directory to resume from.

    spec "" / None: no resume (None). "auto": the newest checkpoint in `save_dir` (train.save_dir), or None
    when there is none yet (a fresh run). A save directory (holding `latest` or step-* dirs): its newest
    checkpoint, an error if none is complete. Any other path: that checkpoint directory, validated — a
    one-line error names the first missing file.
    """
    if spec is None or str(spec) == "":
        return None
    if str(spec) == "auto":
        if save_dir is None:
            raise ValueError("resolve_checkpoint('auto') needs save_dir (train.save_dir)")
        return _newest(Path(save_dir))
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint path {path} is not a directory")
    if (path / LATEST).exists() or any(STEP_DIR.match(p.name) for p in path.iterdir()):
        found = _newest(path)
        if found is None:
            raise FileNotFoundError(
                f"no complete checkpoint in {path} (a step-* directory needs {', '.join(REQUIRED_FILES)})"
            )
        return found
    require_complete(path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Loaded:
    """Read a checkpoint directory: weights via safetensors, state.pt with torch.load(weights_only=True)."""
    path = Path(path)
    require_complete(path)
    device = str(torch.device(map_location))
    return Loaded(
        model_state=read_file(path / MODEL_FILE, load_file, device=device),
        ema_state=read_file(path / EMA_FILE, load_file, device=device),
        train_state=read_file(path / STATE_FILE, torch.load, map_location=map_location, weights_only=True),
        config_dict=json.loads((path / CONFIG_FILE).read_text()),
        meta=json.loads((path / META_FILE).read_text()),
    )
