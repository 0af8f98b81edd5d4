"""Validation during training: a grid of fixed prompts sampled with the EMA weights, and a held-out loss.

Everything random is fixed by [validation].seed, so two runs (or a run and its resume) draw the same grid noise and
score the same held-out rows with the same noise at the same timesteps: their curves can be laid over each other.

- Grid: image k starts from noise seeded `seed + k` (as `Pipeline.__call__` draws it) and is denoised with [sample]'s
  sampler, steps and CFG by a copy of the MMDiT holding the EMA weights, then written to
  `save_dir/samples/step-XXXXXXXX.png` with the prompts under the images, and logged to wandb as an image.
- Loss: `rows` rows of the held-out shards ([validation].parquet_folder, a folder the training sampler never reads)
  are read and encoded once, at start, by the same RowLoader + Conditioner the loader ranks use — on this model rank,
  so loader mode needs no new message between ranks — and kept. Each validation evaluates the flow loss of the
  trained (not EMA) weights, the ones the training loss is measured on, at `timesteps` fixed t: the midpoints in
  probability of equal-probability buckets of train's logit-normal t, so their plain mean estimates the training
  objective while each bucket shows one noise level.

Only model rank 0 validates (the others wait at their next all_reduce). Under FSDP the trained weights and the EMA
are shards and a sharded forward is a collective, so at a validation step every model rank first joins the gathers
of both (`gather_for_validation`; the other ranks run a ValidationPeer), and rank 0 validates on full copies in its
sampling model: the loss then runs at the sampling dtype, as FSDP's own forward runs at its bf16 param_dtype. Its
cost, set-up included, is reported as `val_time_pct` of the wall time since the Validator was built.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from sd3.batch import Batch
from sd3.config import Config
from sd3.data.batches import RowLoader
from sd3.data.index import BucketIndex
from sd3.data.sampler import BucketBatchSampler
from sd3.encoders.conditioner import Conditioner
from sd3.encoders.vae import LatentVAE
from sd3.eval.grid import captioned_grid
from sd3.sample.pipeline import Pipeline, build_in_dtype, drop_vae_encoder
from sd3.sample.samplers import make_timesteps
from sd3.seeds import generator
from sd3.train.ema import EMA, unwrap
from sd3.train.flow import add_noise, flow_loss, velocity_target
from sd3.train.fsdp import full_tensors, is_sharded

MAX_BATCH = 16  # images per forward, as Pipeline.__call__'s default max_batch


def loss_timesteps(n: int, mean: float, std: float) -> torch.Tensor:
    """(n,) t at the probability midpoints (k + 0.5) / n of t = sigmoid(N(mean, std²)), the training distribution."""
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.sigmoid(mean + std * torch.special.ndtri(p)).float()


def sample_dir(save_dir: str | Path) -> Path:
    return Path(save_dir) / "samples"


def validation_due(cfg: Config, step: int) -> bool:
    """Every validation.every steps and at the last step of the run; never when every = 0."""
    every = cfg.validation.every
    return every > 0 and (step % every == 0 or step == cfg.train.total_steps)


def gather_for_validation(model: nn.Module, ema: EMA,
                          keep: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Under FSDP: the full trained and EMA weights, (model, ema). Collectives every model rank joins in the same
    order; only a rank with keep=True (rank 0) holds the result, the others get ({}, {})."""
    return full_tensors(unwrap(model).state_dict(), keep), ema.state_dict(keep)


class ValidationPeer:
    """The StepHook of model ranks other than 0 under FSDP: at each validation step, take part in rank 0's gathers
    of the sharded weights (rank 0 cannot gather them alone), then go on to the next step."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def maybe_run(self, step: int, model: nn.Module, ema: EMA, logger,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        if validation_due(self.cfg, step):
            gather_for_validation(model, ema, keep=False)


class Validator:
    """Validates the run of `cfg` on `device`; build it on model rank 0 only, before the first training step.

    Set-up loads the encoders on `device`, encodes the prompts and the held-out rows, then frees the text encoders
    and keeps the VAE decoder and a second MMDiT in the sampling dtype (bf16 unless train.precision is fp32/fp16).
    """

    def __init__(self, cfg: Config, device: torch.device):
        start = time.perf_counter()
        self.cfg = cfg
        self.device = device
        self.out_dir = sample_dir(cfg.train.save_dir)
        vc = cfg.validation
        if not vc.prompts:
            raise ValueError("validation.prompts is empty: name at least one prompt, or set validation.every=0")
        threads = torch.get_num_threads()
        conditioner = Conditioner(cfg, device)  # on a CPU it sets encoders.cpu_threads: a loader's, not this rank's
        torch.set_num_threads(threads)
        with torch.inference_mode():
            context, pooled = conditioner.text.encode(list(vc.prompts))  # (P, 2T, D), (P, P_dim)
        self.context, self.pooled = context.float().clone(), pooled.float().clone()
        self.heldout = self._encode_heldout(conditioner) if vc.parquet_folder else []
        del conditioner  # the text encoders and the VAE encoder are done: only the decoder is needed from here
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hand the encoders' memory back before training allocates its activations

        self.t = loss_timesteps(vc.timesteps, cfg.train.timestep_mean, cfg.train.timestep_std)  # (K,)
        # One fixed noise draw per held-out batch, shared by all K timesteps (common random numbers: the buckets
        # differ by t alone).
        self.noise = [torch.randn(b.latents.shape, generator=generator(vc.seed, "validation-noise", i))
                      for i, b in enumerate(self.heldout)]  # each (B, C, h, w)

        dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(cfg.train.precision, torch.bfloat16)
        vae = LatentVAE.load(cfg.encoders.vae, cfg.encoders.vae_subfolder, device, cfg.encoders.vae_dtype,
                             latent_norm=cfg.encoders.latent_norm)
        drop_vae_encoder(vae)
        self.pipe = Pipeline(build_in_dtype(cfg, device, dtype), cfg, None, vae, device, dtype, offload=False)
        self.wall_start = start
        self.spent = time.perf_counter() - start
        self.setup_s = self.spent

    def _encode_heldout(self, conditioner: Conditioner) -> list[Batch]:
        """The first `rows` rows of a fixed walk over the held-out shards, encoded like training batches."""
        vc = self.cfg.validation
        index = BucketIndex.load(vc.bucket_indices_path, vc.parquet_folder)
        sampler = BucketBatchSampler(index, vc.batch_size, seed=vc.seed, min_bucket_size=1)
        batches, total = [], 0
        with RowLoader(vc.parquet_folder, self.cfg.data, row_counts=index.manifest["rows"]) as rows:
            for step in range(sampler.batches_per_epoch):
                if total >= vc.rows:
                    break
                planned = sampler.batch(step)
                raw = rows.load(planned)
                gen = torch.Generator(device=conditioner.device).manual_seed(planned.seed_for_step)
                batch = conditioner(raw, gen)  # bad rows are already skipped (and counted) by the RowLoader
                keep = min(len(batch), vc.rows - total)
                if keep:
                    batches.append(Batch(*[t[:keep] for t in batch.tensors()]).to("cpu", torch.float32))
                    total += keep
        if not batches:
            raise ValueError(f"validation.parquet_folder {vc.parquet_folder}: no readable held-out rows")
        return batches

    @property
    def rows(self) -> int:
        return sum(len(b) for b in self.heldout)

    def due(self, step: int) -> bool:
        return validation_due(self.cfg, step)

    # ------------------------------------------------------------------------------------------------ the parts

    @torch.no_grad()
    def heldout_loss(self, model: nn.Module,
                     autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:
        """{"val_loss": mean over buckets, "val_loss_t{k}": bucket k} for `model` on the held-out rows (its inputs in
        the dtype of its weights: fp32 for the trained model, the sampling dtype for the sampling copy)."""
        model = unwrap(model)
        dtype = next(model.parameters()).dtype
        was_training = model.training
        model.eval()
        sums = torch.zeros(len(self.t), dtype=torch.float64)
        for batch, noise in zip(self.heldout, self.noise, strict=True):
            x0 = batch.latents.to(self.device)  # (B, C, h, w)
            eps = noise.to(self.device)  # (B, C, h, w)
            target = velocity_target(x0, eps)  # (B, C, h, w)
            context = batch.context.to(self.device, dtype)  # (B, 2T, D)
            pooled = batch.pooled.to(self.device, dtype)  # (B, P)
            for k, t_k in enumerate(self.t.tolist()):
                t = torch.full((len(batch),), t_k, device=self.device)  # (B,)
                with autocast():
                    pred = model(add_noise(x0, eps, t).to(dtype), t, context, pooled)  # (B, C, h, w)
                sums[k] += flow_loss(pred, target).item() * len(batch)
        model.train(was_training)
        per_t = sums / self.rows
        values = {"val_loss": float(per_t.mean())}
        values.update({f"val_loss_t{k}": float(v) for k, v in enumerate(per_t.tolist())})
        return values

    def sample_images(self, ema: EMA | dict[str, torch.Tensor]) -> list[Image.Image]:
        """The prompts sampled with the EMA weights (the EMA, or its gathered full weights): image k from noise
        seeded seed + k, as Pipeline.__call__."""
        s = self.cfg.sample
        if isinstance(ema, EMA):
            ema.copy_to(self.pipe.model)
        else:
            self.pipe.model.load_state_dict(ema, strict=True)
        down = self.cfg.model.vae_downsample
        n = len(self.cfg.validation.prompts)
        noise = torch.cat([
            torch.randn(1, self.cfg.model.in_channels, s.height // down, s.width // down,
                        generator=torch.Generator().manual_seed(self.cfg.validation.seed + k))
            for k in range(n)]).to(self.device)  # (P, C, h, w), drawn on the CPU: the same on any device
        context, pooled = self.context.to(self.device, self.pipe.dtype), self.pooled.to(self.device, self.pipe.dtype)
        uncond = (torch.zeros_like(context), torch.zeros_like(pooled))  # the null condition training drops to
        gen = torch.Generator(self.device).manual_seed(self.cfg.validation.seed + n)  # stochastic samplers' noise
        timesteps = make_timesteps(s.num_steps, s.shift)  # (N+1,) as Pipeline.__call__ without an init image
        images = []
        for lo in range(0, n, MAX_BATCH):
            sl = slice(lo, lo + MAX_BATCH)
            latents = self.pipe.denoise(noise[sl], context[sl], pooled[sl], (uncond[0][sl], uncond[1][sl]),
                                        s.cfg_scale, timesteps, s.sampler, gen)  # (b, C, h, w)
            images += self.pipe.decode(latents)
        return images

    def grid(self, ema: EMA | dict[str, torch.Tensor], step: int) -> Path:
        """samples/step-XXXXXXXX.png: the EMA weights' images with their prompts under them."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step-{step:08d}.png"
        captioned_grid(self.sample_images(ema), list(self.cfg.validation.prompts)).save(path)
        return path

    # ------------------------------------------------------------------------------------------------ one call

    def run(self, step: int, model: nn.Module, ema: EMA,
            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict[str, Any]:
        """Validate at `step`: {"val_loss"..., "val_grid": path, "val_seconds", "val_time_pct"}."""
        start = time.perf_counter()
        averaged: EMA | dict[str, torch.Tensor] = ema
        if is_sharded(unwrap(model)):  # FSDP: the other model ranks run ValidationPeer.maybe_run meanwhile
            weights, averaged = gather_for_validation(model, ema, keep=True)
            self.pipe.model.load_state_dict(weights, strict=True)
            model = self.pipe.model
        values: dict[str, Any] = self.heldout_loss(model, autocast) if self.heldout else {}
        values["val_grid"] = str(self.grid(averaged, step))
        seconds = time.perf_counter() - start
        self.spent += seconds
        values["val_seconds"] = seconds
        values["val_time_pct"] = 100.0 * self.spent / max(time.perf_counter() - self.wall_start, 1e-9)
        return values

    def maybe_run(self, step: int, model: nn.Module, ema: EMA, logger,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict | None:
        """`run` when `due(step)`: scalars to metrics.jsonl and wandb through `logger` (a RunLogger), the grid to
        wandb as a wandb.Image. Returns what was logged, or None."""
        if not self.due(step):
            return None
        values = self.run(step, model, ema, autocast)
        grid = values.pop("val_grid")
        logger.log(step, values)
        wandb_sink = getattr(logger, "wandb", None)
        if wandb_sink is not None and wandb_sink.run is not None:
            import wandb  # only when a wandb run is live: the logger imported it already

            wandb_sink.log({"validation/samples": wandb.Image(grid, caption=f"step {step}")}, step)
        logger.info(f"validation at step {step}: {grid}" + (
            f", val_loss {values['val_loss']:.4f}" if "val_loss" in values else ""))
        return {**values, "val_grid": grid}

