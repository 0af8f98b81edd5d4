"""Every setting of sd3, as typed dataclasses — one per concern. A choice is a `Literal[...]` of its options.

A run is described by one `Config`. sd3/config_loader.py builds it from a named preset shipped in `sd3/configs/`
(or a path to a TOML file) and `--section.key=value` overrides, type- and range-checked once there. The resolved
config is saved into every checkpoint as JSON; `config_loader.config_from_dict` reads it back.

Defaults are the values of the source README (003_5bc3fb5fdb7c8fe6.txt, "The base params I used").
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Dtype = Literal["fp32", "bf16", "fp16"]


@dataclass
class ModelConfig:
    """The MMDiT (ARCHITECTURE §2). Reference size: 19 blocks, dim 64·19, 19 heads -> ~1.2B parameters."""

    in_channels: int = 16  # VAE latent channels (FLUX.1 VAE)
    patch_size: int = 2
    num_blocks: int = 19
    dim: int = 1216  # 64 * num_blocks, the SD3 paper's formula
    num_heads: int = 19
    hidden_scale: float = 4.0  # MLP hidden width = dim * hidden_scale
    mlp_type: Literal["swiglu", "gelu"] = "swiglu"
    # RoPE2d: 2D rotary on image q/k (the trained source models); RoPE: 1D rotary over the raster order; RoPE2dV2: the
    # source's 3-D rotations of channel triples (SEED_SPEC §b); absolute: fixed sin-cos added to the patches; NoPE.
    positional_encoding: Literal["RoPE2d", "RoPE", "RoPE2dV2", "absolute", "NoPE"] = "RoPE2d"
    # softmax: QK-RMSNorm + softmax attention; cosine: the source's linear attention with L2-normalised q/k and a
    # learnable per-head length exponent, out = q̂(k̂ᵀv) / L^sigmoid(a) (SEED_SPEC §a).
    attention: Literal["softmax", "cosine"] = "softmax"
    # Average keys and values over adjacent token pairs of each stream before attention: half the key length (§c).
    kv_merge_attn: bool = False
    # Queries and keys at half the width (D/2); values and outputs stay at D (§d).
    qk_half_dim: bool = False
    # A text head (Linear(D, context_dim)) regressing the encoder embeddings; the last block keeps its text path.
    # Set it with train.text_loss_weight > 0 (§e); it is part of the architecture, so checkpoints record it here.
    text_loss: bool = False
    # Options that reproduce the source's checkpoints (`sd3 import-seed`, SEED_SPEC §g); defaults are ours.
    # time_embedding "seed": a dim-wide sinusoid [sin(even), cos(odd)] and a Linear without bias.
    time_embedding: Literal["sd3", "seed"] = "sd3"
    # head_modulation "seed": the final norm's shift/scale come straight from y (no SiLU(Linear) before them).
    head_modulation: Literal["sd3", "seed"] = "sd3"
    # False: RoPE2d positions ignore max_res / max_res_orig, as the source's RoPE2d did (its interpolate_factor
    # only reached 1D RoPE and RoPE2dV2).
    rope_interpolate: bool = True
    # Text context: `text_tokens` tokens per encoder part, parts in order [Gemma, ModernBERT].
    # `text_dims` are each part's real feature width; the context tensor is zero-padded to max(text_dims).
    text_tokens: int = 77
    text_dims: list[int] = field(default_factory=lambda: [2304, 1024])
    pooled_dim: int = 768  # Meta-CLIP text projection
    vae_downsample: int = 8  # pixels per latent cell
    # RoPE positions are divided by max_res / max_res_orig so a model trained at 256 can be fine-tuned at 512/1024.
    max_res: int = 256
    max_res_orig: int = 256
    # Initial value of each text part's learnable scalar (source: 0.01, so text starts with little influence). The
    # blocks layer-normalise the text stream, so below ~0.1 the projection's bias outweighs the caption there and a
    # short run from scratch learns its captions slowly: tiny-cpu starts at 1.0.
    text_scale_init: float = 0.01
    checkpoint_attn: bool = False
    checkpoint_mlp: bool = False
    attention_backend: Literal["auto", "flash", "xformers", "sdpa"] = "auto"

    @property
    def context_dim(self) -> int:
        return max(self.text_dims)


@dataclass
class DataConfig:
    """Bucketed parquet shards and the sampler over them (ARCHITECTURE §4)."""

    parquet_folder: str = "data/phase_256"
    bucket_indices_path: str = "data/bucket_indices_256.npz"
    batch_size: int = 140  # per model rank; a loader draws batch_size x (its consumers) rows per step
    min_bucket_size: int = 0  # buckets with fewer rows are dropped (0 = the global batch size)
    seed: int = 0
    long_caption_prob: float = 0.5  # per batch: `recaption` with this probability, else `recaption_short`
    drop_article_prob: float = 0.5  # drop a leading "A "/"An "
    strip_punctuation_prob: float = 0.5  # strip a trailing punctuation mark
    decode_threads: int = 4  # threads decoding images on a loader rank
    # Folder of the VAE posterior cache written by `sd3 cache --only vae` (sd3/data/latents.py). Set, the producer
    # (loader rank, or a colocated model rank) reads each image's posterior instead of decoding and VAE-encoding it,
    # and draws the latent with the step's generator; captions stay online. "" = encode images online.
    # topology.mode=hybrid requires it.
    latent_cache: str = ""


@dataclass
class EncodersConfig:
    """Frozen text encoders and VAE run by loader ranks (ARCHITECTURE §5). Hub ids or local folders."""

    clip: str = "facebook/metaclip-l14-400m"
    gemma: str = "google/gemma-2-2b"
    bert: str = "answerdotai/ModernBERT-large"
    vae: str = "black-forest-labs/FLUX.1-schnell"
    vae_subfolder: str = "vae"
    text_dtype: Dtype = "bf16"
    vae_dtype: Dtype = "bf16"
    device: str = "auto"  # auto | cpu | cuda; auto = this rank's GPU when there is one
    batch_dtype: Dtype = "fp32"  # dtype of the Batch floats a loader sends (latents, context, pooled)
    # torch CPU threads set by the Conditioner when it runs on cpu; 0 = torch's default. On a shared CPU one thread
    # per process avoids OpenMP threads spinning against each other (`sd3 bench loader`: 426 vs 15 images/s).
    cpu_threads: int = 0
    # Latent normalisation: diffusers' (z - shift)·scale, or the source's z·scale + shift (a converted source
    # checkpoint was trained on the latter, SEED_SPEC §g item 5).
    latent_norm: Literal["diffusers", "seed"] = "diffusers"
    # Encode a step's captions in length-sorted micro-batches padded only to each micro-batch's longest caption,
    # then place them into the fixed (B, 2T, D) layout (padding zero, as untrimmed). Exact: Gemma is causal and
    # ModernBERT and CLIP mask padding, so real tokens never see the padding (tests/encoders/test_trim.py); on by
    # default because it only removes work. False: one forward per encoder over the whole step, padded to its longest.
    trim_text: bool = True
    # Captions per text-encoder forward when trim_text; 0 = sized to the step (about an eighth of its captions, at
    # least 16: sd3.encoders.text.resolve_micro_batch), so small 1024 px steps are trimmed too.
    text_micro_batch: int = 0
    # The VAE encodes a step's images in micro-batches of vae_micro_batch images (0 = as many as fit in
    # vae_memory_gb of activations by sd3.encoders.vae.activation_bytes, so 1024 px steps do not run out of memory).
    vae_micro_batch: int = 0
    vae_memory_gb: float = 8.0  # activation budget of one VAE encoder forward (0 = no bound: the whole step at once)
    vae_channels_last: bool = True  # NHWC convolutions (cuDNN's fast layout for bf16/fp16)
    vae_compile: bool = False  # torch.compile the VAE encoder (dynamic shapes: one graph for every bucket)


# Modes with dedicated loader ranks (hybrid: they read the cached VAE posterior instead of running the VAE).
LOADER_MODES = ("loader", "hybrid")


@dataclass
class TopologyConfig:
    """Which ranks load data and which train (ARCHITECTURE §6)."""

    # loader (dedicated loader ranks) | hybrid (loader ranks reading VAE posteriors from data.latent_cache)
    # | colocated | cached
    mode: Literal["loader", "hybrid", "colocated", "cached"] = "loader"
    # Global rank of each loader -> global ranks of its model ranks. TOML keys are strings: {"0" = [2, 3, 4]}.
    # Empty: derived per node from loaders_per_node and models_per_loader.
    loader_to_model: dict[str, list[int]] = field(default_factory=dict)
    loaders_per_node: int = 2
    models_per_loader: int = 3
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPUs, gloo on CPU
    timeout_minutes: float = 10.0  # a rank silent for longer is named and the job stops
    max_in_flight: int = 2  # batches sent but not yet received, per consumer
    cache_folder: str = "data/cache_256"  # mode=cached: where `sd3 cache` writes latents and embeddings


@dataclass
class TrainConfig:
    """The model-rank loop (ARCHITECTURE §3, §7, §8)."""

    total_steps: int = 300_000  # optimizer steps
    accumulation_steps: int = 2
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    lr_schedule: Literal["constant", "cosine", "wsd"] = "constant"  # (the source's use_lr_scheduler=False is constant)
    lr_decay_fraction: float = 0.2  # wsd: the last fraction of total_steps over which the lr decays linearly to 0
    grad_clip: float = 1.0
    # Autocast dtype; fp16 adds a GradScaler. auto: bf16 where the device runs it natively (CUDA with bf16, a CPU with
    # AVX512-BF16 or AMX), else fp32 — emulated bf16 on a CPU without them is 4-5x slower than fp32 (sd3/devices.py).
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "bf16"
    null_prob_pooled: float = 0.1
    null_prob_gemma: float = 0.316  # 0.316^2 ~ 0.1: both text parts dropped 10% of the time
    null_prob_bert: float = 0.316
    # Logit-normal timesteps t = sigmoid(N(mean, std^2)) (SD3 paper eq. 19: 0 / 1). A positive mean trains more
    # near pure noise, where only the caption tells what to draw: tiny latents (8x8 at 64 px) lose the
    # global colour to noise only above t ~ 0.9, which N(0, 1) reaches for ~1% of samples.
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    ema_update_every: int = 100
    ema_decay: float = 0.99
    # device: the fp32 shadow on the model's device, updated with one fused _foreach_lerp_ (a 1.2B model's 5 GB
    # shadow costs less there than a 5 GB device-to-host copy plus a single-threaded lerp every update); cpu
    # saves that accelerator memory.
    ema_device: Literal["device", "cpu"] = "device"
    save_every: int = 1000
    keep_last: int = 3
    # Keep every N-th step's checkpoint forever as weights + EMA only (optimizer dropped), besides the last
    # keep_last full ones (the source kept all its intermediate checkpoints); 0 = off.
    keep_every: int = 0
    # How long the other model ranks wait for rank 0 to write a checkpoint (a gloo barrier of its own, outside
    # the NCCL watchdog): writing ~20 GB to a network file system can take many minutes.
    save_timeout_minutes: float = 60.0
    bucket_cap_mb: int = 25  # DDP all-reduce bucket size (torch's default 25)
    # How the model ranks share the work: ddp keeps a full replica (weights, gradients, AdamW state) on each rank;
    # fsdp (FSDP2, fully_shard per block) shards all three over the model ranks, for models that do not fit
    # replicated (2B+, or the 1.2B at larger batch on 40 GB GPUs). Checkpoints are the same files in both modes.
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    # Per-block gradient and weight norms (after unscaling) to metrics.jsonl and wandb every N steps; 0 = off.
    grad_norms_every: int = 0
    save_dir: str = "runs/sd3"
    resume: str = ""  # "" | auto | PATH to a checkpoint directory
    # A new stage from another run's checkpoint (weights and EMA; reset_optim / reset_wandb apply), used only while
    # this save_dir has no checkpoint of its own: with resume=auto a requeued job continues its own progress.
    init_from: str = ""
    reset_optim: bool = True  # on resume: fresh optimizer/scheduler (source default for resolution fine-tuning)
    reset_wandb: bool = True  # on resume: start a new wandb run
    log_every: int = 10
    wandb_project: str = "sd3"
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with a key, else offline
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    seed: int = 0
    deterministic: bool = False
    compile: bool = False
    num_threads: int = 0  # CPU threads of a model rank (torch.set_num_threads); 0 = torch's default
    # Weight of the masked text-embedding regression (SEED_SPEC §e); > 0 needs model.text_loss = true.
    text_loss_weight: float = 0.0
    record_rows: bool = False  # each model rank appends the row ids it trains on to <save_dir>/rows/rank<R>.txt (audit)


@dataclass
class SampleConfig:
    """Defaults for `sd3 sample` and the notebook (source "Inference")."""

    # euler | euler_stochastic | heun (the source's, SEED_SPEC §l) | euler_ancestral | heun_edm (sd3/sample/samplers.py)
    sampler: Literal["euler", "euler_stochastic", "heun", "euler_ancestral", "heun_edm"] = "euler"
    num_steps: int = 50
    cfg_scale: float = 5.0
    width: int = 256
    height: int = 256
    batch_size: int = 1
    seed: int = -1  # -1 = random; the seed used is reported
    negative_prompt: str = ""
    use_ema: bool = True
    # The SD3 paper's timestep shift t' = s·t / (1 + (s − 1)·t) (§5.3.2): > 1 spends more steps at high noise, which
    # larger images need (SD3 uses 3.0 at 1024²); 1.0 = the unshifted grid.
    shift: float = 1.0
    # Image-to-image: how far the init image is noised (t = strength) before sampling; 0 = unchanged, 1 = pure noise.
    strength: float = 0.6


# Prompts of the validation grid when a preset names none: one per kind of scene a general model should draw.
DEFAULT_VALIDATION_PROMPTS = [
    "A photo of a red fox sitting in the snow.",
    "A bowl of ramen on a wooden table, top view.",
    "An oil painting of a lighthouse in a storm.",
    "A city street at night in the rain, neon signs.",
    "A portrait of an old man with a white beard.",
    "A watercolor of mountains at sunrise.",
    "A red sports car parked in front of a modern house.",
    "A cute cartoon robot holding a flower.",
]


@dataclass
class ValidationConfig:
    """Validation during training (sd3/eval/validation.py): a grid of fixed prompts with the EMA weights, and the
    loss on held-out rows at fixed timesteps with fixed noise, so curves compare across runs and resumes.

    The grid uses [sample]'s sampler, num_steps, cfg_scale, width and height.
    """

    every: int = 5000  # optimizer steps between validations; 0 = off
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_VALIDATION_PROMPTS))
    seed: int = 0  # image k of the grid starts from noise seeded seed + k; also seeds the held-out rows' noise
    # Held-out phase shards (and their bucket index) the training sampler never draws: a folder of its own, so
    # holding out changes nothing in the training stream. "" = no validation loss, only the grid.
    parquet_folder: str = ""
    bucket_indices_path: str = ""
    rows: int = 64  # held-out rows, encoded once when training starts and kept
    batch_size: int = 16  # held-out rows per forward
    timesteps: int = 8  # the loss at this many quantiles of train's logit-normal t (one bucket each)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
