"""Checkpoint directories (sd3/train/checkpoint.py): round trip, atomicity, pruning, weights_only, secrets."""

import json
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from sd3.config import Config
from sd3.config_loader import config_from_dict, load_config
from sd3.train.checkpoint import WEIGHT_FILES, check_weights_only, load_checkpoint, resolve_checkpoint, save_checkpoint
from sd3.train.rng import capture_rng_state, restore_rng_state
from sd3.train.schedule import build_scheduler
from sd3.train.secrets import scrub_secrets


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # shared storage under two keys: safetensors refuses it as is


def _states(seed: int = 0):
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = build_scheduler(opt, Config().train)
    model.a(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    model_state = dict(model.state_dict())
    model_state["view"] = torch.randn(6, 4).t()  # non-contiguous
    model_state["bf16"] = torch.randn(3, dtype=torch.float32).to(torch.bfloat16)
    ema_state = {k: v.detach().float().clone() + 1 for k, v in model_state.items()}
    train_state = {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": capture_rng_state(),
        "samplers": [{"seed": 0, "step": 7}, {"seed": 0, "step": 7}],
        "step": 7,
        "images_seen": 112,
        "wandb_run_id": "abc123",
    }
    return model_state, ema_state, train_state


def _save(save_dir, step, keep_last=3, config=None, meta=None, keep_every=0):
    model_state, ema_state, train_state = _states(step)
    return save_checkpoint(
        save_dir, step, model_state, ema_state, train_state,
        config if config is not None else Config().to_dict(), meta or {"wandb_run_id": "abc123"}, keep_last,
        keep_every,
    )


def _equal_trees(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_trees(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_trees(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_round_trip_is_exact_and_state_loads_weights_only(tmp_path):
    model_state, ema_state, train_state = _states(1)
    config = load_config("tiny-cpu").to_dict()
    path = save_checkpoint(tmp_path, 1, model_state, ema_state, train_state, config, {"wandb_run_id": "r1"}, 3)
    assert path == tmp_path / "step-00000001"
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.safetensors", "ema.safetensors", "state.pt", "config.json", "meta.json"]
    )
    loaded = load_checkpoint(resolve_checkpoint("auto", tmp_path))
    assert _equal_trees(model_state, loaded.model_state)
    assert _equal_trees(ema_state, loaded.ema_state)
    assert _equal_trees(train_state, loaded.train_state)
    assert torch.load(path / "state.pt", weights_only=True)["step"] == 7
    assert config_from_dict(loaded.config_dict).to_dict() == config
    assert loaded.meta == {"wandb_run_id": "r1", "step": 1}
    # The optimizer state goes back into a fresh optimizer and steps exactly like the one it was saved from.
    torch.manual_seed(1)
    saved_model = Tied()
    saved_opt = torch.optim.AdamW(saved_model.parameters(), lr=1e-3)
    saved_model.a(torch.randn(2, 4)).sum().backward()
    saved_opt.step()
    saved_opt.zero_grad()
    model = Tied()
    model.load_state_dict(saved_model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(load_checkpoint(save_checkpoint(
        tmp_path / "opt", 1, dict(saved_model.state_dict()), {}, {"optimizer": saved_opt.state_dict()}, {}, {}, 3,
    )).train_state["optimizer"])
    assert _equal_trees(opt.state_dict(), saved_opt.state_dict())
    for m, o in ((model, opt), (saved_model, saved_opt)):
        m.a(torch.ones(2, 4)).sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), saved_model.parameters(), strict=True))


def test_rng_states_restore_every_generator():
    state = capture_rng_state()
    first = (torch.rand(3), random.random(), np.random.rand(3), torch.randn(2))
    restore_rng_state(state)
    second = (torch.rand(3), random.random(), np.random.rand(3), torch.randn(2))
    assert torch.equal(first[0], second[0]) and first[1] == second[1]
    assert np.array_equal(first[2], second[2]) and torch.equal(first[3], second[3])
    check_weights_only(state, "rng")


def test_non_weights_only_values_are_refused_before_writing(tmp_path):
    model_state, ema_state, train_state = _states()
    with pytest.raises(TypeError, match=r"train_state\['counters'\]\['x'\]: numpy.ndarray"):
        save_checkpoint(tmp_path, 1, model_state, ema_state, {"counters": {"x": np.zeros(2)}}, {}, {}, 3)
    with pytest.raises(TypeError, match="float64"):
        check_weights_only({"loss": np.float64(1.0)})
    assert not any(tmp_path.iterdir())


def test_keep_last_prunes_oldest_and_keeps_latest(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step * 10, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000040", "step-00000050"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000050"
    # Saving an older step (e.g. after a rollback) must not delete the directory that `latest` names.
    _save(tmp_path, 5, keep_last=1)
    assert (tmp_path / "latest").read_text().strip() == "step-00000005"
    assert (tmp_path / "step-00000005").is_dir() and resolve_checkpoint(tmp_path) == tmp_path / "step-00000005"
    keep_all = tmp_path / "all"
    for step in range(1, 4):
        _save(keep_all, step, keep_last=0)
    assert len(list(keep_all.glob("step-*"))) == 3


def test_resolve_ignores_half_written_and_stale_entries(tmp_path):
    assert resolve_checkpoint("", tmp_path) is None
    assert resolve_checkpoint("auto", tmp_path / "nothing-yet") is None
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    # A crashed save of a process that no longer exists; and a step dir missing a file.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    half = tmp_path / f".tmp-step-00000003-{dead.pid}"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    broken = tmp_path / "step-00000009"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    assert resolve_checkpoint("auto", tmp_path) == tmp_path / "step-00000002"
    # `latest` naming a vanished directory: fall back to the newest complete one.
    (tmp_path / "latest").write_text("step-00000007\n")
    assert resolve_checkpoint(tmp_path) == tmp_path / "step-00000002"
    with pytest.raises(FileNotFoundError, match=r"step-00000009 is incomplete: missing ema.safetensors"):
        resolve_checkpoint(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    _save(tmp_path, 4)
    assert not half.exists()  # cleaned by the next save


CRASH_SCRIPT = """
import os, signal, sys, torch
from sd3.train import checkpoint as ckpt
save_dir = sys.argv[1]
state = {"w": torch.arange(6.0)}
ckpt.save_checkpoint(save_dir, 1, state, state, {"step": 1}, {"a": 1}, {}, 3)
real_write_json = ckpt._write_json
def crash_on_meta(path, obj):
    if path.name == "meta.json":
        os.kill(os.getpid(), signal.SIGKILL)  # a hard crash after the weights and state are on disk
    real_write_json(path, obj)
ckpt._write_json = crash_on_meta
ckpt.save_checkpoint(save_dir, 2, {"w": torch.ones(6)}, state, {"step": 2}, {"a": 1}, {}, 3)
"""


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-step-00000002-")]
    assert len(leftovers) == 1 and not (tmp_path / "step-00000002").exists()
    found = resolve_checkpoint("auto", tmp_path)
    assert found == tmp_path / "step-00000001"
    loaded = load_checkpoint(found)
    assert torch.equal(loaded.model_state["w"], torch.arange(6.0)) and loaded.train_state == {"step": 1}
    _save(tmp_path, 3)
    assert not (tmp_path / leftovers[0]).exists()


def test_a_crash_before_latest_keeps_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    from sd3.train import checkpoint as ckpt

    _save(tmp_path, 1)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_write_latest", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    assert (tmp_path / "step-00000002").is_dir()  # complete, but not yet announced
    assert resolve_checkpoint("auto", tmp_path) == tmp_path / "step-00000001"


def test_config_json_never_holds_secrets(tmp_path, monkeypatch):
    token = "hf_dummyTokenForTheTest0123456789abcdef"
    wandb_key = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("WANDB_API_KEY", wandb_key)
    config = load_config("tiny-cpu").to_dict()
    # A real config loses nothing: no false positives on fields like model.text_tokens.
    assert scrub_secrets(config) == (config, [])
    leaky = json.loads(json.dumps(config))
    leaky["encoders"]["hf_token"] = token
    leaky["encoders"]["mirror"] = f"https://user:{token}@example.org/models"
    leaky["train"]["wandb_api_key"] = "something-else"
    leaky["train"]["notes"] = ["fine", wandb_key]
    leaky["data"]["other_secret"] = "x" * 12
    path = _save(tmp_path, 1, config=leaky, meta={"wandb_run_id": "r", "auth": token})
    for name in ("config.json", "meta.json"):
        text = (path / name).read_text()
        assert token not in text and wandb_key not in text and "something-else" not in text, name
    saved = json.loads((path / "config.json").read_text())
    assert "hf_token" not in saved["encoders"] and "mirror" not in saved["encoders"]
    assert "other_secret" not in saved["data"] and saved["train"]["notes"] == ["fine"]
    assert saved["model"]["text_tokens"] == config["model"]["text_tokens"]
    assert json.loads((path / "meta.json").read_text()) == {"wandb_run_id": "r", "step": 1}


def test_keep_every_keeps_weights_forever_and_drops_the_optimizer(tmp_path):
    for step in range(10, 101, 10):
        _save(tmp_path, step, keep_last=2, keep_every=30)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step-00000030", "step-00000060", "step-00000090", "step-00000100"]
    for kept in ("step-00000030", "step-00000060"):  # out of keep_last: weights, EMA, config, meta; no state.pt
        assert sorted(p.name for p in (tmp_path / kept).iterdir()) == sorted(WEIGHT_FILES)
        assert json.loads((tmp_path / kept / "meta.json").read_text())["weights_only"] is True
        loaded = load_checkpoint(resolve_checkpoint(tmp_path / kept))
        assert loaded.train_state == {} and loaded.model_state and loaded.ema_state
    for full in ("step-00000090", "step-00000100"):  # the last keep_last are full, even 90 (a multiple of 30)
        assert (tmp_path / full / "state.pt").is_file()
    # resume=auto never picks a weights-only checkpoint; keep_last counts full checkpoints only.
    assert resolve_checkpoint("auto", tmp_path) == tmp_path / "step-00000100"
    _save(tmp_path, 110, keep_last=2, keep_every=30)
    _save(tmp_path, 120, keep_last=2, keep_every=30)
    assert not (tmp_path / "step-00000090" / "state.pt").exists() and (tmp_path / "step-00000090").is_dir()
    assert not (tmp_path / "step-00000100").exists()  # not a multiple of 30: removed once out of keep_last
