"""Every setting of sd3, as typed dataclasses — one per concern — plus TOML presets and CLI overrides.

A run is described by one `Config`. It is built from a named preset shipped in `sd3/configs/`
(or a path to a TOML file), then `--section.key=value` overrides from the command line, each
type-checked against the dataclass field it names. The resolved config is saved into every
checkpoint as JSON; `Config.from_dict` reads it back.

Defaults are the values of the source README (003_5bc3fb5fdb7c8fe6.txt, "The base params I used").
"""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A bad preset, key or value. The message is one line and names the culprit."""


@dataclass
class ModelConfig:
    """The MMDiT (ARCHITECTURE §2). Reference size: 19 blocks, dim 64·19, 19 heads -> ~1.2B parameters."""

    in_channels: int = 16  # VAE latent channels (FLUX.1 VAE)
    patch_size: int = 2
    num_blocks: int = 19
    dim: int = 1216  # 64 * num_blocks, the SD3 paper's formula
    num_heads: int = 19
    hidden_scale: float = 4.0  # MLP hidden width = dim * hidden_scale
    mlp_type: str = "swiglu"  # swiglu | gelu
    positional_encoding: str = "RoPE2d"  # RoPE2d | absolute | NoPE
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
    attention_backend: str = "auto"  # auto | flash | xformers | sdpa

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
    text_dtype: str = "bf16"  # fp32 | bf16 | fp16
    vae_dtype: str = "bf16"
    device: str = "auto"  # auto | cpu | cuda; auto = this rank's GPU when there is one
    batch_dtype: str = "fp32"  # fp32 | bf16 | fp16: dtype of the Batch floats a loader sends (latents, context, pooled)
    # torch CPU threads set by the Conditioner when it runs on cpu; 0 = torch's default. On a shared CPU one thread
    # per process avoids OpenMP threads spinning against each other (`sd3 bench loader`: 426 vs 15 images/s).
    cpu_threads: int = 0
    # Encode a step's captions in length-sorted micro-batches padded only to each micro-batch's longest caption,
    # then place them into the fixed (B, 2T, D) layout (padding zero, as untrimmed). Exact: Gemma is causal and
    # ModernBERT and CLIP mask padding, so real tokens never see the padding (tests/encoders/test_trim.py); on by
    # default because it only removes work. False: one forward per encoder over the whole step, padded to its longest.
    trim_text: bool = True
    # Captions per text-encoder forward when trim_text: 64 x ~60 tokens keeps GPU GEMMs large.
    text_micro_batch: int = 64
    # The VAE encodes a step's images in micro-batches of vae_micro_batch images (0 = as many as fit in
    # vae_memory_gb of activations by sd3.encoders.vae.activation_bytes, so 1024 px steps do not run out of memory).
    vae_micro_batch: int = 0
    vae_memory_gb: float = 8.0  # activation budget of one VAE encoder forward (0 = no bound: the whole step at once)
    vae_channels_last: bool = True  # NHWC convolutions (cuDNN's fast layout for bf16/fp16)
    vae_compile: bool = False  # torch.compile the VAE encoder (dynamic shapes: one graph for every bucket)


@dataclass
class TopologyConfig:
    """Which ranks load data and which train (ARCHITECTURE §6)."""

    # loader (dedicated loader ranks) | hybrid (loader ranks reading VAE posteriors from data.latent_cache)
    # | colocated | cached
    mode: str = "loader"
    # Global rank of each loader -> global ranks of its model ranks. TOML keys are strings: {"0" = [2, 3, 4]}.
    # Empty: derived per node from loaders_per_node and models_per_loader.
    loader_to_model: dict[str, list[int]] = field(default_factory=dict)
    loaders_per_node: int = 2
    models_per_loader: int = 3
    backend: str = "auto"  # auto (nccl on GPUs, gloo on CPU) | nccl | gloo
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
    lr_schedule: str = "constant"  # constant | cosine (the source's use_lr_scheduler=False is constant)
    grad_clip: float = 1.0
    precision: str = "bf16"  # bf16 | fp16 | fp32 (autocast dtype; fp16 adds a GradScaler)
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
    ema_device: str = "cpu"  # cpu | device
    save_every: int = 1000
    keep_last: int = 3
    save_dir: str = "runs/sd3"
    resume: str = ""  # "" | auto | PATH to a checkpoint directory
    reset_optim: bool = True  # on resume: fresh optimizer/scheduler (source default for resolution fine-tuning)
    reset_wandb: bool = True  # on resume: start a new wandb run
    log_every: int = 10
    wandb_project: str = "sd3"
    wandb_mode: str = "auto"  # auto (online with a key, else offline) | online | offline | disabled
    max_nonfinite: int = 10  # stop after this many non-finite steps in a row
    seed: int = 0
    deterministic: bool = False
    compile: bool = False
    num_threads: int = 0  # CPU threads of a model rank (torch.set_num_threads); 0 = torch's default
    record_rows: bool = False  # each model rank appends the row ids it trains on to <save_dir>/rows/rank<R>.txt (audit)


@dataclass
class SampleConfig:
    """Defaults for `sd3 sample` and the notebook (source "Inference")."""

    sampler: str = "euler"  # euler | euler_stochastic | heun
    num_steps: int = 50
    cfg_scale: float = 5.0
    width: int = 256
    height: int = 256
    batch_size: int = 1
    seed: int = -1  # -1 = random; the seed used is reported
    negative_prompt: str = ""
    use_ema: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, tree: dict[str, Any], source: str = "config") -> Config:
        cfg = cls()
        apply_tree(cfg, tree, source)
        return cfg


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A preset (name in sd3/configs or a .toml path), then `section.key=value` overrides, type-checked."""
    cfg = Config()
    if name_or_path:
        path = Path(name_or_path)
        if not path.suffix:
            path = PRESET_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise ConfigError(f"config '{name_or_path}' not found: not a file and not a preset ({', '.join(preset_names())})")
        try:
            tree = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        apply_tree(cfg, tree, str(path))
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def apply_tree(cfg: Config, tree: dict[str, Any], source: str) -> None:
    for section, values in tree.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{section}' (expected one of {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: '{section}' must be a table")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)


def apply_override(cfg: Config, item: str) -> None:
    """`section.key=value` (a leading `--` is allowed). Values are parsed as TOML, else taken as a string."""
    text = item[2:] if item.startswith("--") else item
    if "=" not in text:
        raise ConfigError(f"override '{item}' is not of the form --section.key=value")
    dotted, raw = text.split("=", 1)
    set_value(cfg, dotted, parse_value(raw))


def parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:  # {0: [2, 3, 4]}-style maps, as the source wrote loader_to_model_gpu; literal_eval runs no code
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"unknown config key '{dotted}' (expected section.key with section in {', '.join(SECTIONS)})")
    section_name, key = parts
    section = getattr(cfg, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        raise ConfigError(f"unknown config key '{dotted}' (keys of [{section_name}]: {', '.join(fields)})")
    hint = typing.get_type_hints(type(section))[key]
    setattr(section, key, coerce(value, hint, dotted))


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if not typing.get_args(hint) else str(hint).replace("typing.", "")


def coerce(value: Any, hint: Any, dotted: str) -> Any:
    """Check `value` against a field's type hint; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = ConfigError(f"config key '{dotted}' expects {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [coerce(v, args[0], dotted) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {str(k): coerce(v, args[1], dotted) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return coerce(value, option, dotted)
            except ConfigError:
                continue
        raise bad
    raise bad
