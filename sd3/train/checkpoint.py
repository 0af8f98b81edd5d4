"""The checkpoint file format, in one place: names, atomic writes, retention, resolving, reading (ARCHITECTURE §7).

Layout::

    <save_dir>/step-00012000/model.safetensors   model weights, keys as in model.state_dict()
                            /ema.safetensors     fp32 EMA weights, same keys
                            /state.pt            the training components' states (optimizer, scheduler, scaler,
                                                 train state: step, counters, RNG, data position): tensors,
                                                 numbers, strings, lists, dicts only, so that
                                                 torch.load(weights_only=True) reads it
                            /config.json         the resolved Config.to_dict(), secrets scrubbed
                            /meta.json           step, wandb run id, data position: what a loader rank reads
                                                 to resume (it never opens the ~10 GB state.pt)
    <save_dir>/latest                            text file naming the newest step directory, written last

A save writes everything into `<save_dir>/.tmp-step-XXXXXXXX-<pid>`, fsyncs the files and the directory,
renames it to `step-XXXXXXXX` (atomic on POSIX), then replaces `latest` the same way. A crash at any point
leaves either the previous checkpoint as `latest` or a complete new one; temporary directories of dead
processes are removed by the next save.

Retention: the newest `keep_last` full checkpoints stay; with `keep_every = N` a step that is a multiple of N
is kept forever as weights only (state.pt removed, meta.json marked `weights_only`), like the source's
intermediate checkpoints but without their optimizer state. Weights-only checkpoints can be sampled from and
started from with reset_optim, never resumed exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sd3.errors import read_file
from sd3.train.secrets import scrub_secrets

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
WEIGHT_FILES = (MODEL_FILE, EMA_FILE, CONFIG_FILE, META_FILE)  # what a weights-only (keep_every) checkpoint has
REQUIRED_FILES = (*WEIGHT_FILES, STATE_FILE)  # a full checkpoint: resumable exactly
LATEST = "latest"
TMP_PREFIX = ".tmp-"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
TMP_ENTRY = re.compile(r"^\.tmp-.*-(\d+)$")


class Loaded(NamedTuple):
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]  # {} for a weights-only checkpoint
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
    keep_every: int = 0,
) -> Path:
    """Write `<save_dir>/step-<8 digits>/` atomically, point `latest` at it, keep the newest `keep_last` full
    ones and, with keep_every = N > 0, the weights of every step divisible by N.

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
    _prune(save_dir, keep_last, keep_every, keep=name)
    return final


def _complete_step_dirs(save_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of the complete full checkpoints in save_dir, oldest first (weights-only ones are not)."""
    found = []
    for entry in save_dir.iterdir() if save_dir.is_dir() else []:
        m = STEP_DIR.match(entry.name)
        if m and entry.is_dir() and not missing_files(entry):
            found.append((int(m.group(1)), entry))
    return sorted(found)


def _prune(save_dir: Path, keep_last: int, keep_every: int, keep: str) -> None:
    if keep_last < 1:
        return
    dirs = _complete_step_dirs(save_dir)
    for step, path in dirs[:-keep_last]:
        if path.name == keep:
            continue
        if keep_every > 0 and step % keep_every == 0:
            strip_to_weights(path)
            continue
        # Rename first: a crash during rmtree leaves a temporary, not a half-deleted step directory.
        trash = save_dir / f"{TMP_PREFIX}trash-{path.name}-{os.getpid()}"
        os.rename(path, trash)
        _remove(trash)


def strip_to_weights(path: Path) -> None:
    """Turn a full checkpoint into a weights-only one: meta.json marked first, then state.pt removed, so a crash
    in between leaves a full checkpoint that says it is weights-only (harmless: its files are all there)."""
    meta = read_meta(path)
    meta["weights_only"] = True
    tmp = path / f"{TMP_PREFIX}{META_FILE}-{os.getpid()}"
    _write_json(tmp, meta)
    os.replace(tmp, path / META_FILE)
    (path / STATE_FILE).unlink(missing_ok=True)
    _fsync_path(path)


# ----------------------------------------------------------------------------------------------- resolve / load


def missing_files(path: Path, full: bool = True) -> list[str]:
    """The files a full (or, full=False, a weights-only) checkpoint needs that `path` lacks."""
    return [f for f in (REQUIRED_FILES if full else WEIGHT_FILES) if not (path / f).is_file()]


def is_weights_only(path: Path) -> bool:
    """A checkpoint kept by keep_every: weights and EMA, no state.pt."""
    return not (path / STATE_FILE).is_file() and not missing_files(path, full=False)


def require_complete(path: Path) -> None:
    """A one-line FileNotFoundError naming the first file a checkpoint directory lacks (a weights-only one is
    complete when it has its weights, EMA, config and meta)."""
    missing = missing_files(path, full=not is_weights_only(path))
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


def check_checkpoint(path: str | Path) -> None:
    """Every file of a checkpoint readable, without loading it: the safetensors headers and state.pt's structure
    (memory-mapped). A model rank calls it before it builds anything, so a corrupt or unsafe file is the first
    error named, not whatever the data set-up would have failed on."""
    path = Path(path)
    require_complete(path)
    for name in (MODEL_FILE, EMA_FILE):
        read_file(path / name, lambda p: safe_open(str(p), "pt").keys())
    if (path / STATE_FILE).is_file():
        read_file(path / STATE_FILE, torch.load, map_location="cpu", weights_only=True, mmap=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Loaded:
    """Read a checkpoint directory: weights via safetensors, state.pt (if any) with torch.load(weights_only=True)."""
    path = Path(path)
    require_complete(path)
    device = str(torch.device(map_location))
    state_file = path / STATE_FILE
    train_state = (read_file(state_file, torch.load, map_location=map_location, weights_only=True)
                   if state_file.is_file() else {})
    return Loaded(
        model_state=read_file(path / MODEL_FILE, load_file, device=device),
        ema_state=read_file(path / EMA_FILE, load_file, device=device),
        train_state=train_state,
        config_dict=json.loads((path / CONFIG_FILE).read_text()),
        meta=read_meta(path),
    )


def read_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint directory: small, so loader ranks read their data position from it alone."""
    return json.loads((Path(path) / META_FILE).read_text())
