"""`sd3 bench balance`: does the planner predict the stall of a real loader-bound job? (CPU, issue 12)

The job: real-width, reduced-depth encoders (Gemma-2-2B, ModernBERT-large and Meta-CLIP text at their published
widths with 1 layer each, the FLUX VAE at its widths with 1 layer per block; random weights, written once with
save_pretrained and loaded through the normal from_pretrained path) and a small MMDiT, so one loader cannot keep
up with its model rank. Per variant:
1. loader alone: the real BatchProducer (shards -> decode -> encoders) of one loader, seconds per step;
2. model alone: the real Trainer's train_step() on a replayed encoded batch, seconds per step;
3. predicted stall: sd3.plan.layout.predict() of the 1 loader : 1 model layout from those two step times;
4. measured stall: the real 2-process torchrun job (`sd3 train`, 1 loader + 1 model rank, one core each, so the
   two measurements above are what each process gets) — the mean stall_pct of its metrics.jsonl windows after
   the first.
Prints predicted vs measured per variant; the goal is that they differ by <= 5 points.

VARIANTS maps a name to config overrides, the cheaper-loader settings of issue 13:
- base: full online, untrimmed text (one forward per encoder, padded to the step's longest caption);
- trimmed: encoders.trim_text with micro-batches of 1 caption (a step here has only `--batch` captions, so the
  default would be one micro-batch, i.e. untrimmed). The shapes captions of one step are nearly equally long, so
  trimming saves little here and one forward per caption costs more than it saves; whether trimming saves what the
  plan predicts is measured apart, where it pays: one step of `--mix-rows` captions with the planner's lengths
  (PlanSettings.caption_tokens_*: ~60 tokens, spread 25 %) through the same encoders, untrimmed vs trimmed in
  micro-batches of `--mix-micro-batch`, against the planner's token-position ratio (sd3/plan/captions.py);
- vae_chunked: the VAE in micro-batches of 1 image (encoders.vae_micro_batch), channels_last;
- hybrid: topology.mode=hybrid reading the VAE posteriors that `sd3 cache --only vae` writes (run by this bench
  into WORKDIR/latents, incremental) — the loader runs the text encoders only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS: dict[str, list[str]] = {
    "base": ["--encoders.trim_text=false"],
    "trimmed": ["--encoders.trim_text=true", "--encoders.text_micro_batch=1"],
    "vae_chunked": ["--encoders.trim_text=false", "--encoders.vae_micro_batch=1", "--encoders.vae_channels_last=true"],
    "hybrid": ["--encoders.trim_text=false", "--topology.mode=hybrid"],
}
TEXT_PARTS = ("gemma", "bert", "clip")
THREADS = 1  # per process: 1 loader + 1 model rank on the 2 cores


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny-cpu", help="preset the job starts from (default tiny-cpu)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=24, help="training steps of the torchrun job")
    parser.add_argument("--timing-steps", type=int, default=6, help="steps timed alone (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=4, help="images per model rank")
    parser.add_argument("--model-dim", type=int, default=256, help="MMDiT width (the loader must be slower)")
    parser.add_argument("--model-blocks", type=int, default=4, help="MMDiT blocks")
    parser.add_argument("--workdir", default="data/bench-balance", help="models + shapes data (made if missing)")
    parser.add_argument("--mix-rows", type=int, default=32, help="captions of the trimming check's step")
    parser.add_argument("--mix-micro-batch", type=int, default=8, help="its captions per trimmed forward")


def write_encoders(root: Path) -> None:
    """Real-width, 1-layer encoders with the tiny tokenizers (vocabularies cut to them: lookups cost no FLOPs)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, Gemma2Model, ModernBertModel

    from sd3.encoders.tiny import bert_tokenizer, clip_tokenizer, gemma_tokenizer
    from sd3.plan.encoders import text_config, vae_kwargs

    torch.manual_seed(0)
    for part, model_class, make_tok in (("gemma", Gemma2Model, gemma_tokenizer),
                                        ("bert", ModernBertModel, bert_tokenizer),
                                        ("clip", CLIPTextModelWithProjection, clip_tokenizer)):
        tok = make_tok()
        config = text_config(part, layers=1)
        config.vocab_size = len(tok)
        config.pad_token_id, config.bos_token_id = tok.pad_token_id, tok.bos_token_id
        config.eos_token_id = tok.eos_token_id
        if part == "bert":
            config.cls_token_id, config.sep_token_id = tok.cls_token_id, tok.sep_token_id
        model_class(config).save_pretrained(root / part)
        tok.save_pretrained(root / part)
    AutoencoderKL(**vae_kwargs(layers=1)).save_pretrained(root / "flux" / "vae")
    (root / "complete").write_text("written by sd3 bench balance\n")


def prepare(workdir: Path, args: argparse.Namespace) -> list[str]:
    from sd3.data.synthetic import prepare_shapes

    models = workdir / "models"
    if not (models / "complete").exists():
        print(f"bench balance: writing real-width 1-layer encoders -> {models}", flush=True)
        write_encoders(models)
    data = prepare_shapes(workdir / "shapes", 400, max_res=64,
                          log=lambda stage, status: print(f"bench balance: {stage} {status}", flush=True))
    return [
        f"--encoders.gemma={models / 'gemma'}", f"--encoders.bert={models / 'bert'}",
        f"--encoders.clip={models / 'clip'}", f"--encoders.vae={models / 'flux'}", "--encoders.vae_subfolder=vae",
        "--model.text_dims=[2304, 1024]", "--model.pooled_dim=768",
        f"--model.dim={args.model_dim}", f"--model.num_blocks={args.model_blocks}", "--model.num_heads=4",
        f"--data.parquet_folder={data.phase}", f"--data.bucket_indices_path={data.index}",
        f"--data.batch_size={args.batch}", "--data.decode_threads=1",
        "--topology.mode=loader", "--topology.backend=gloo", "--topology.loaders_per_node=1",
        "--topology.models_per_loader=1", f"--encoders.cpu_threads={THREADS}", f"--train.num_threads={THREADS}",
        "--train.accumulation_steps=1", "--train.wandb_mode=disabled", "--train.save_every=100000",
        "--train.ema_update_every=100000",
    ]


def latent_cache(workdir: Path, config: str, overrides: list[str]) -> str:
    """The hybrid variant's posterior cache, written by the real `sd3 cache --only vae` (skips complete shards)."""
    folder = workdir / "latents"
    cmd = [sys.executable, "-m", "sd3", "cache", "--config", config, "--only", "vae", *overrides,
           f"--data.latent_cache={folder}"]
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
    if done.returncode:
        raise RuntimeError(f"sd3 cache --only vae failed (exit code {done.returncode})")
    return str(folder)


def loader_step_s(cfg, steps: int) -> tuple[float, dict[str, float]]:
    """Seconds per step of one loader's BatchProducer on this process (one thread), and per part (decode, each
    encoder) per step."""
    from sd3.encoders.producer import BatchProducer

    producer = BatchProducer(cfg, cfg.data.batch_size, 0, 1, "cpu")
    try:
        for step in range(2):
            _, warm, _ = producer(step)
        warm = dict(warm)
        start = time.perf_counter()
        for step in range(2, 2 + steps):
            _, timings, _ = producer(step)
        elapsed = (time.perf_counter() - start) / steps
        return elapsed, {part: (s - warm.get(part, 0.0)) / steps for part, s in timings.items()}
    finally:
        producer.close()


def caption_mix(cfg):
    """Token counts (per text part) of the shards' own `recaption` / `recaption_short` captions."""
    import numpy as np
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from sd3.plan.captions import CaptionMix

    files = sorted(Path(cfg.data.parquet_folder).rglob("*.parquet"))
    table = pq.read_table(files[0], columns=["recaption", "recaption_short"])
    mixes = {}
    for part in TEXT_PARTS:
        tok = AutoTokenizer.from_pretrained(getattr(cfg.encoders, part))
        lengths = {col: np.array([len(i) for i in tok(table[col].to_pylist())["input_ids"]])
                   for col in ("recaption", "recaption_short")}
        mixes[part] = CaptionMix(lengths["recaption"], lengths["recaption_short"], cfg.data.long_caption_prob)
    return mixes


def trimming_on_the_plan_mix(cfg, rows: int, micro_batch: int, repeats: int = 5) -> dict[str, float]:
    """Seconds per text part of one step of `rows` long captions drawn from the planner's mix, untrimmed and trimmed
    (micro-batches of `micro_batch`); the planner's ratio of token positions for exactly those captions; each
    encoder's fixed cost per forward (one caption of one token: PlanSettings.text_forward_overhead_s measured here);
    and the planner's trimmed seconds from those (sd3.plan.captions.step_seconds on the untrimmed measurement)."""
    import copy

    import numpy as np

    from sd3.encoders.text import TextEncoders, padded_tokens
    from sd3.plan.captions import CaptionMix, forwards_per_step, step_seconds
    from sd3.plan.settings import PlanSettings

    settings = PlanSettings()
    mix = CaptionMix.normal(settings.caption_tokens_long, settings.caption_tokens_short,
                            settings.caption_tokens_spread, 1.0)
    words = np.minimum(np.random.default_rng(0).choice(mix.long, size=rows), 70)  # (rows,): < CLIP's 77 window
    captions = [" ".join(["red"] * int(n)) for n in words]  # one token per word in every tiny tokenizer
    untrimmed = TextEncoders.load(cfg.encoders, 77, torch.device("cpu"))
    untrimmed.micro_batch = 0
    trimmed = copy.copy(untrimmed)
    trimmed.micro_batch = micro_batch
    variants = {"untrimmed": untrimmed, "trimmed": trimmed}
    inputs = {"untrimmed": captions, "trimmed": captions, "one_token": ["red"]}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in inputs}
    for name, given in inputs.items():
        variants.get(name, untrimmed).encode(given)  # warm-up, each input shape once
    for r in range(repeats):  # interleaved, in alternating order, so a slow spell of the machine hits all
        for name in (list(inputs) if r % 2 == 0 else list(inputs)[::-1]):
            timings = {p: 0.0 for p in TEXT_PARTS}
            variants.get(name, untrimmed).encode(inputs[name], timings)
            runs[name].append(timings)
    out: dict[str, float] = {}
    for name, found in runs.items():
        for part in TEXT_PARTS:
            out[f"{part}_s_{name}"] = min(t[part] for t in found)  # the least disturbed run
    forwards = forwards_per_step(rows, micro_batch)
    for part, tokenizer in (("gemma", untrimmed.gemma_tokenizer), ("bert", untrimmed.bert_tokenizer),
                            ("clip", untrimmed.clip_tokenizer)):
        lengths = [len(i) for i in tokenizer(captions, max_length=77, truncation=True)["input_ids"]]
        positions = padded_tokens(lengths)
        out[f"{part}_token_ratio"] = padded_tokens(lengths, micro_batch) / positions
        # The planner's model fitted to the untrimmed step: its time less one forward's overhead is per position.
        overhead = out[f"{part}_s_one_token"]
        position_s = max(0.0, out[f"{part}_s_untrimmed"] - overhead) / positions
        out[f"{part}_s_trimmed_predicted"] = step_seconds(position_s, padded_tokens(lengths, micro_batch), forwards,
                                                          overhead)
    return out


def predicted_text_ratio(cfg, mixes) -> dict[str, float]:
    """Per text part: the planner's token positions trimmed / untrimmed on these captions at this step size."""
    from sd3.encoders.text import resolve_micro_batch
    from sd3.plan.captions import tokens_per_caption
    from sd3.plan.encoders import text_config

    ratios = {}
    for part, mix in mixes.items():
        window = cfg.model.text_tokens
        if part == "clip":
            window = text_config("clip", folder=Path(cfg.encoders.clip)).max_position_embeddings
        rows = cfg.data.batch_size
        ratios[part] = (tokens_per_caption(mix, rows, window, resolve_micro_batch(cfg.encoders.text_micro_batch, rows))
                        / tokens_per_caption(mix, rows, window, 0))
    return ratios


class ReplaySource:
    """One encoded batch handed out again and again: the Trainer's step without any loader behind it."""

    num_loaders = 1
    counts_rows = True

    def __init__(self, batch, sampler) -> None:
        from sd3.train.sources import SourceStats

        # sampler: the producer's, whose state the Trainer records as the run's data identity.
        self.batch, self.stats, self.sampler = batch, SourceStats(step=0), sampler

    def next(self):
        return self.batch, self.stats

    def stop(self, step: int) -> None:
        pass

    def fail(self, message: str) -> None:
        pass


def model_step_s(cfg, steps: int) -> float:
    """Seconds per optimizer step of the real Trainer on one thread, fed a replayed batch of the job's shape."""
    from sd3.encoders.producer import BatchProducer
    from sd3.train.trainer import ModelRanks, Trainer

    producer = BatchProducer(cfg, cfg.data.batch_size, 0, 1, "cpu")
    try:
        batch, _, _ = producer(0)
    finally:
        producer.close()
    trainer = Trainer(cfg, ModelRanks(torch.device("cpu")), ReplaySource(batch, producer.sampler))
    for _ in range(2):
        trainer.train_step()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    elapsed = (time.perf_counter() - start) / steps
    trainer.reporter.close()
    return elapsed


def measured_stall(config: str, overrides: list[str], steps: int) -> tuple[float, int, float]:
    """Mean stall_pct over the log windows after the first, of the real 2-process job; (stall, windows, the model
    rank's busy seconds per step there: step_s x (1 - stall), to set beside its step time measured alone)."""
    from sd3.commands.arguments import torchrun_entry
    from sd3.distributed.topology import free_port

    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}",
               *torchrun_entry(), "train", "--config", config, *overrides, f"--train.save_dir={out}",
               f"--train.total_steps={steps}", "--train.log_every=4"]
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)
        if done.returncode:
            raise RuntimeError(f"the 2-process job failed (exit code {done.returncode})")
        windows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    later = windows[1:]
    busy = sum(w["step_s"] * (1 - w["stall_pct"] / 100) for w in later) / len(later)
    return sum(w["stall_pct"] for w in later) / len(later), len(later), busy


def main(args: argparse.Namespace) -> int:
    from sd3.bench import print_result
    from sd3.config_loader import load_config
    from sd3.errors import ConfigError
    from sd3.plan.layout import Layout, predict

    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    workdir = Path(args.workdir)
    base = prepare(workdir, args) + list(args.overrides)
    if "hybrid" in names:
        base.append(f"--data.latent_cache={latent_cache(workdir, args.config, base)}")
    torch.set_num_threads(THREADS)
    figures: dict[str, float | int] = {}
    text_s: dict[str, float] = {}
    for name in names:
        # Only hybrid reads the cache: the other variants encode images online, as their names say.
        overrides = [o for o in base if name == "hybrid" or not o.startswith("--data.latent_cache=")] + VARIANTS[name]
        cfg = load_config(args.config, overrides)
        (loader_s, parts), model_s = loader_step_s(cfg, args.timing_steps), model_step_s(cfg, args.timing_steps)
        b = cfg.data.batch_size
        predicted = predict(Layout((1,)), b, loader_s / b, model_s / b).stall_pct
        measured, windows, busy_in_job = measured_stall(args.config, overrides, args.steps)
        text_s[name] = sum(parts.get(p, 0.0) for p in TEXT_PARTS)
        print(f"bench balance [{name}]: loader {loader_s:.3f} s/step (text {text_s[name]:.3f}, vae "
              f"{parts.get('vae', 0.0):.3f}), model {model_s:.3f} s/step -> predicted stall {predicted:.1f} %, "
              f"measured {measured:.1f} % ({windows} windows; the model rank busy {busy_in_job:.3f} s/step there)",
              flush=True)
        figures.update({f"loader_step_s_{name}": loader_s, f"model_step_s_{name}": model_s,
                        f"text_step_s_{name}": text_s[name], f"vae_step_s_{name}": parts.get("vae", 0.0),
                        f"predicted_stall_pct_{name}": predicted, f"measured_stall_pct_{name}": measured,
                        f"stall_error_points_{name}": abs(predicted - measured),
                        f"model_busy_s_in_job_{name}": busy_in_job})
    if {"base", "trimmed"} <= set(names):
        # On the shards' own captions: the planner's token ratios, and what the job's loader saved (or lost).
        cfg = load_config(args.config, [o for o in base if "latent_cache" not in o] + VARIANTS["trimmed"])
        ratios = predicted_text_ratio(cfg, caption_mix(cfg))
        figures.update({f"trimmed_token_ratio_{p}": r for p, r in ratios.items()})
        figures["trimmed_text_saving_s_shapes_job"] = text_s["base"] - text_s["trimmed"]
    if "trimmed" in names:
        # Where trimming pays: the planner's caption mix; saving measured vs predicted, summed over the encoders.
        cfg = load_config(args.config, [o for o in base if "latent_cache" not in o] + VARIANTS["trimmed"])
        mix = trimming_on_the_plan_mix(cfg, args.mix_rows, args.mix_micro_batch)
        before = sum(mix[f"{p}_s_untrimmed"] for p in TEXT_PARTS)
        measured_saving = before - sum(mix[f"{p}_s_trimmed"] for p in TEXT_PARTS)
        predicted_saving = before - sum(mix[f"{p}_s_trimmed_predicted"] for p in TEXT_PARTS)
        positions_only = sum(mix[f"{p}_s_untrimmed"] * (1 - mix[f"{p}_token_ratio"]) for p in TEXT_PARTS)
        figures.update({f"plan_mix_{k}": v for k, v in mix.items()})
        figures.update({"trimmed_text_saving_pct_measured": 100.0 * measured_saving / before,
                        "trimmed_text_saving_pct_predicted": 100.0 * predicted_saving / before,
                        "trimmed_text_saving_pct_positions_only": 100.0 * positions_only / before,
                        "trimmed_saving_error_pct": 100.0 * abs(measured_saving - predicted_saving)
                        / max(predicted_saving, 1e-12)})
        print(f"bench balance: on the plan's caption mix ({args.mix_rows} captions, micro-batches of "
              f"{args.mix_micro_batch}) trimming saves {100 * measured_saving / before:.1f} % of the text encoders' "
              f"time; the plan predicts {100 * predicted_saving / before:.1f} % with the fixed cost per forward "
              f"measured here ({100 * positions_only / before:.1f} % counting token positions only)", flush=True)
    print_result(figures)
    return 0
