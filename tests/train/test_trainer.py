"""The model-rank loop in one process: a real colocated run, non-finite steps, a stop signal, the optimizer split."""

from __future__ import annotations

import json
import math
import os
import signal
import threading

import pytest
import torch
from fixtures.training import train_overrides
from torch.utils._python_dispatch import TorchDispatchMode

from sd3.batch import Batch
from sd3.config_loader import load_config
from sd3.distributed import signals
from sd3.seeds import stream_seed
from sd3.train.checkpoint import load_checkpoint, resolve_checkpoint
from sd3.train.logging import resolve_wandb_mode
from sd3.train.sources import ColocatedSource
from sd3.train.step import build_optimizer
from sd3.train.trainer import ModelRanks, NonFiniteError, Trainer


def test_tiny_checkpoint_is_a_complete_run(tiny_checkpoint):
    run_dir = tiny_checkpoint.parent
    assert resolve_checkpoint(run_dir) == tiny_checkpoint
    loaded = load_checkpoint(tiny_checkpoint, map_location="cpu")  # state.pt through torch.load(weights_only=True)
    state = loaded.train_state
    assert set(state) == {"optimizer", "scheduler", "scaler", "train"}  # one entry per component
    assert state["train"]["step"] == 4 and state["train"]["micro_step"] == 4 and "rng" in state["train"]
    # The data position is the loader's BucketBatchSampler.state_dict() at the checkpoint, in state.pt and meta.json.
    position = state["train"]["sampler"]
    assert position["step"] == 4 and position["loader_rows"] == [2] and "loader_index" not in position
    assert loaded.meta["sampler"] == position
    assert set(state["optimizer"]["state"]) and state["scheduler"]["last_epoch"] == 4
    assert any(not torch.equal(loaded.model_state[k], loaded.ema_state[k]) for k in loaded.model_state)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    balance = json.loads((run_dir / "balance.json").read_text())  # the BalanceMonitor's end-of-run figures
    assert balance["step"] == 4 and "balance_stall_pct_max_mean" in balance
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all("loader_busy_pct" in r and "loader_wait_pct" in r for r in records)
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 and "stall_pct" in r for r in records)
    assert records[0]["mfu_pct"] is None  # no known peak on a CPU


class Wrapped:
    """A real colocated source with one thing changed in `next`; stop and fail go to the source."""

    def __init__(self, source: ColocatedSource):
        self.source = source
        self.num_loaders = source.num_loaders
        self.counts_rows = source.counts_rows
        self.sampler = source.sampler

    def stop(self, step: int) -> None:
        self.source.stop(step)

    def fail(self, message: str) -> None:
        self.source.fail(message)


class Poisoned(Wrapped):
    """A real colocated source whose latents become NaN at the given micro-steps (a corrupt batch)."""

    def __init__(self, source: ColocatedSource, bad_steps: set[int]):
        super().__init__(source)
        self.bad_steps = bad_steps

    def next(self):
        batch, stats = self.source.next()
        if stats.step in self.bad_steps:
            batch.latents = torch.full_like(batch.latents, float("nan"))
        return batch, stats


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_nonfinite_steps_never_reach_weights_or_ema(tiny_models, shapes_phase, tmp_path):
    cfg = load_config("tiny-cpu", train_overrides(tiny_models, shapes_phase, tmp_path, "--train.max_nonfinite=2",
                                                  "--train.total_steps=10", "--train.precision=fp32"))
    device = torch.device("cpu")
    source = Poisoned(ColocatedSource(cfg, 0, 1, device, 0), bad_steps={1, 3, 4})
    trainer = Trainer(cfg, ModelRanks(device), source)
    try:
        assert not trainer.train_step().skipped
        before, ema_before = weights(trainer.model), trainer.ema.state_dict()
        result = trainer.train_step()  # micro-step 1: NaN latents
        assert result.skipped and not math.isfinite(result.loss.item())
        assert all(torch.equal(before[k], v) for k, v in weights(trainer.model).items())
        assert all(torch.equal(ema_before[k], v) for k, v in trainer.ema.state_dict().items())
        assert trainer.state.nonfinite_steps == 1 and trainer.state.step == 2
        assert not trainer.train_step().skipped  # finite again: the weights move, the streak resets
        assert any(not torch.equal(before[k], v) for k, v in weights(trainer.model).items())
        assert trainer.state.nonfinite_in_row == 0
        assert trainer.train_step().skipped
        with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
            trainer.train_step()
    finally:
        source.stop(trainer.state.micro_step)


class SignalsAt(Wrapped):
    """A real colocated source that sends this process SIGTERM while serving micro-step `at`."""

    def __init__(self, source: ColocatedSource, at: int):
        super().__init__(source)
        self.at = at

    def next(self):
        batch, stats = self.source.next()
        if stats.step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch, stats


def test_sigterm_checkpoints_the_current_step_and_exits_zero(tiny_models, shapes_phase, tmp_path):
    cfg = load_config("tiny-cpu", train_overrides(tiny_models, shapes_phase, tmp_path, "--train.total_steps=50",
                                                  "--train.save_every=100"))
    device = torch.device("cpu")
    with signals.handled():
        try:
            trainer = Trainer(cfg, ModelRanks(device), SignalsAt(ColocatedSource(cfg, 0, 1, device, 0), at=2))
            assert trainer.train() == signals.PREEMPTED_EXIT_CODE
        finally:
            signals.clear()
    # The signal arrived during step 3 (micro-step 2); the run finished that step, saved it and stopped.
    assert resolve_checkpoint(tmp_path) == tmp_path / "step-00000003"
    state = load_checkpoint(tmp_path / "step-00000003", map_location="cpu").train_state["train"]
    assert state["step"] == 3 and state["sampler"]["step"] == 3


def test_no_weight_decay_on_norms_biases_and_scalars(tiny_models):
    from sd3.model import build_model

    cfg = load_config("tiny-cpu", tiny_models.overrides)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == cfg.train.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_rng_streams_depend_on_every_key():
    base = stream_seed(0, 5, 1, "train")
    assert base == stream_seed(0, 5, 1, "train")
    assert len({base, stream_seed(1, 5, 1, "train"), stream_seed(0, 6, 1, "train"), stream_seed(0, 5, 0, "train"),
                stream_seed(0, 5, 1, "init")}) == 5


def test_wandb_auto_is_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"


def test_wandb_without_a_key_runs_offline_under_our_run_id(monkeypatch, tmp_path):
    from sd3.train.logging import WandbSink

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    sink = WandbSink("sd3-test", "abcdef012345", "auto", tmp_path / "run", {"train": {"lr": 1e-3}})
    try:
        assert sink.mode == "offline" and sink.run is not None
        sink.log({"loss": 1.0, "mfu_pct": None}, step=1)
    finally:
        sink.finish()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*-abcdef012345"))


def test_wandb_failures_never_reach_training(monkeypatch, tmp_path):
    import wandb

    from sd3.train.logging import WandbSink

    def broken_init(**kwargs):
        raise RuntimeError("wandb service unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    sink = WandbSink("sd3-test", "abcdef012345", "online", tmp_path, {})
    assert sink.run is None
    sink.log({"loss": 1.0}, step=1)  # a no-op, not an error
    sink.finish()


class LoaderAsksToStop(Wrapped):
    """A real colocated source whose batch at micro-step `at` carries a loader's "a stop signal reached me" flag."""

    def __init__(self, source: ColocatedSource, at: int):
        super().__init__(source)
        self.at = at

    def next(self):
        batch, stats = self.source.next()
        stats.stop_requested = stats.step >= self.at
        return batch, stats


def test_a_stop_forwarded_by_the_loader_stops_like_a_local_signal(tiny_models, shapes_phase, tmp_path):
    cfg = load_config("tiny-cpu", train_overrides(tiny_models, shapes_phase, tmp_path, "--train.total_steps=50",
                                                  "--train.save_every=100"))
    device = torch.device("cpu")
    trainer = Trainer(cfg, ModelRanks(device), LoaderAsksToStop(ColocatedSource(cfg, 0, 1, device, 0), at=1))
    assert trainer.train() == signals.PREEMPTED_EXIT_CODE
    assert not signals.requested()  # nothing local: the flag came with the batch
    assert resolve_checkpoint(tmp_path) == tmp_path / "step-00000002"


class SyncCounter(TorchDispatchMode):
    """Counts aten._local_scalar_dense (`.item()`, `float(t)`, `bool(t)`): a device-to-host sync on a GPU.

    torch's non-capturable AdamW keeps its `step` counters on the host by design and reads them there; those reads
    are not device syncs (fused AdamW, used on CUDA, keeps them on the device), so they are not counted.
    """

    def __init__(self, host_tensors: set[int]):
        super().__init__()
        self.host_tensors = host_tensors
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].data_ptr() not in self.host_tensors:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_gpu_ready_at_most_one_host_sync_per_non_log_step(tiny_models, shapes_phase, tmp_path, monkeypatch):
    cfg = load_config("tiny-cpu", train_overrides(tiny_models, shapes_phase, tmp_path, "--train.total_steps=10",
                                                  "--train.log_every=100", "--train.ema_update_every=2"))
    device = torch.device("cpu")
    source = ColocatedSource(cfg, 0, 1, device, 0)
    trainer = Trainer(cfg, ModelRanks(device), source)
    try:
        trainer.train_step()  # the optimizer creates its state on the first step
        steps = {id(s["step"]): s["step"] for s in trainer.optimizer.state.values()}
        # Tensor.tolist copies to the host without passing the dispatcher: count its calls on this thread too.
        tolist_calls, real_tolist, main = [0], torch.Tensor.tolist, threading.get_ident()

        def counting_tolist(self):
            tolist_calls[0] += threading.get_ident() == main
            return real_tolist(self)

        monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
        counts = []
        for _ in range(4):  # includes EMA updates (every 2 steps)
            tolist_calls[0] = 0
            with SyncCounter({t.data_ptr() for t in steps.values()}) as counter:
                result = trainer.train_step()
            counts.append(counter.count + tolist_calls[0])
        assert counts == [1, 1, 1, 1], counts  # the skip / stop decision, nothing else
        assert isinstance(result.loss, torch.Tensor) and isinstance(result.grad_norm, torch.Tensor)
    finally:
        source.stop(trainer.state.micro_step)


def test_secret_values_never_reach_config_checkpoint_or_logs(tiny_models, shapes_phase, tmp_path, monkeypatch,
                                                              capfd):
    from sd3.commands.train import run

    hf_token = "hf_" + "Q7xT2mK9pL4vR8nB3wZ6yC1dF5gH0jS2"
    wandb_key = "9f3c2b1a0e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"
    monkeypatch.setenv("WANDB_API_KEY", wandb_key)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", hf_token)
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / ".env").write_text(f"HF_TOKEN={hf_token}\nWANDB_API_KEY={wandb_key}\n")
    monkeypatch.chdir(workdir)  # the .env the hub helper finds from the working directory
    save = tmp_path / "run"
    cfg = load_config("tiny-cpu", train_overrides(tiny_models, shapes_phase, save, "--topology.mode=colocated",
                                                  "--train.total_steps=2", "--train.save_every=2"))
    assert run(cfg) == 0
    out, err = capfd.readouterr()
    written = {p: p.read_bytes() for p in save.rglob("*") if p.is_file()}
    assert {"config.json", "meta.json", "state.pt", "metrics.jsonl"} <= {p.name for p in written}
    for secret in (hf_token, wandb_key):
        assert secret not in out and secret not in err
        for path, data in written.items():
            assert secret.encode() not in data, f"{secret[:6]}... found in {path}"


# ------------------------------------------------------------------------------ train.text_loss_weight (§e)


def test_text_loss_weight_needs_the_text_head():
    from sd3.errors import ConfigError

    with pytest.raises(ConfigError, match="train.text_loss_weight is 0.5 but model.text_loss is false"):
        load_config("tiny-cpu", ["--train.text_loss_weight=0.5"])
    assert load_config("tiny-cpu", ["--train.text_loss_weight=0.5", "--model.text_loss=true"]).model.text_loss


def random_batch(cfg, b: int = 3) -> Batch:
    g = torch.Generator().manual_seed(1)
    m = cfg.model
    return Batch(torch.randn(b, m.in_channels, 4, 4, generator=g),
                 torch.randn(b, 2 * m.text_tokens, m.context_dim, generator=g),
                 torch.randn(b, m.pooled_dim, generator=g), torch.arange(b))


def test_text_loss_weight_zero_is_the_flow_loss_and_positive_adds_the_text_term(tiny_models):
    from sd3.model import build_model
    from sd3.train import flow

    cfg = load_config("tiny-cpu", ["--model.text_loss=true"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    torch.nn.init.normal_(model.text_head.weight, std=0.02)  # zero-initialised: give the head something to say
    batch = random_batch(cfg)
    tc = cfg.train

    def gen():
        return torch.Generator().manual_seed(3)

    # Weight 0: the flow objective exactly as before the text loss existed (CFG dropout, t and noise, velocity).
    g = gen()
    ctx, pooled = flow.cfg_dropout(batch.context, batch.pooled, cfg.model.text_tokens, tc.null_prob_pooled,
                                   tc.null_prob_gemma, tc.null_prob_bert, g)
    t, noise = flow.draw_path(batch.latents, g, tc.timestep_mean, tc.timestep_std)
    plain = flow.velocity_loss(model, batch.latents, t, noise, ctx, pooled)
    assert torch.equal(flow.training_loss(model, batch, gen(), cfg), plain)

    # Weight w: flow loss on the text-hidden input + w x the masked regression, the mask drawn after the noise.
    cfg.train.text_loss_weight = 0.5
    mask = flow.text_loss_mask(flow.kept_parts(ctx, cfg.model.text_tokens), cfg.model.text_tokens, g)
    assert mask.any()
    v, pred = model(flow.add_noise(batch.latents, noise, t), t, flow.hide_text(ctx, mask), pooled, return_text=True)
    expected = flow.flow_loss(v, flow.velocity_target(batch.latents, noise)) + 0.5 * flow.text_loss(pred, ctx, mask)
    got = flow.training_loss(model, batch, gen(), cfg)
    assert torch.equal(got, expected) and got.item() != plain.item()


def test_training_with_the_text_loss_reaches_the_text_head(tiny_models, shapes_phase, tmp_path):
    steps = 6
    cfg = load_config("tiny-cpu", train_overrides(tiny_models, shapes_phase, tmp_path, f"--train.total_steps={steps}",
                                                  "--model.text_loss=true", "--train.text_loss_weight=1.0",
                                                  "--train.precision=fp32"))
    device = torch.device("cpu")
    source = ColocatedSource(cfg, 0, 1, device, 0)
    trainer = Trainer(cfg, ModelRanks(device), source)
    head = trainer.model.text_head
    head_before = head.weight.detach().clone()
    grads = {"weight": [], "bias": []}
    for name in grads:
        getattr(head, name).register_hook(lambda g, name=name: grads[name].append(g.abs().sum().item()))
    try:
        results = [trainer.train_step() for _ in range(steps)]
    finally:
        source.stop(trainer.state.micro_step)
    assert all(math.isfinite(r.loss.item()) and not r.skipped for r in results)
    # The text term is in every backward; it is 0 only when no token was hidden (batch 2: both samples' captions
    # dropped, or no token picked), which this seed's stream does at micro-step 1.
    assert len(grads["bias"]) == steps and sum(g > 0 for g in grads["bias"]) == steps - 1
    # adaLN-Zero: the hidden tokens' text stream is exactly 0 until the zero-initialised output head (step 2, after
    # the warm-up's lr=0 step) and then the blocks' gates (step 3) have moved; from then on the weight learns too.
    assert grads["weight"][-1] > 0
    assert not torch.equal(head.weight, head_before)
