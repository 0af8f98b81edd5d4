"""Presets, `--section.key=value` overrides and the checks every setting gets once, where the config is loaded.

A run's `Config` (sd3/config.py) is built from a named preset in `sd3/configs/` (or a path to a TOML file), then
the command line's overrides. Every value is type-checked against the field it names (a `Literal[...]` field
against its choices), then the ranges below are checked, so a bad value is one line naming key, value and what
was expected (exit 2), before any process group, data or model exists. A checkpoint's config.json is read back
through the same path (`config_from_dict`).
"""

from __future__ import annotations

import ast
import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sd3.config import Config
from sd3.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "configs"
SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A preset (name in sd3/configs or a .toml path), then `section.key=value` overrides, type- and range-checked."""
    cfg = Config()
    if name_or_path:
        path = Path(name_or_path)
        if not path.suffix:
            path = PRESET_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise ConfigError(f"config '{name_or_path}' not found: not a file and not a preset "
                              f"({', '.join(preset_names())})")
        try:
            tree = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        apply_tree(cfg, tree, str(path))
    for item in overrides:
        apply_override(cfg, item)
    check_ranges(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any], source: str = "config") -> Config:
    """A Config from its `to_dict()` form (a checkpoint's config.json), with the same checks as load_config."""
    cfg = Config()
    apply_tree(cfg, tree, source)
    check_ranges(cfg, source)
    return cfg


def apply_tree(cfg: Config, tree: dict[str, Any], source: str) -> None:
    for section, values in tree.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{section}' (expected one of {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: '{section}' must be a table")
        for key, value in values.items():
            try:
                set_value(cfg, f"{section}.{key}", value)
            except ConfigError as e:  # a value from a file: say which file
                raise ConfigError(f"{source}: {e}") from None


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
    if origin is typing.Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ConfigError(f"config key '{dotted}' is {value!r}, not one of {', '.join(map(str, args))}")
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


def at_least(low: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v >= low), f">= {low}"


def above(low: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v > low), f"> {low}"


PROBABILITY = ((lambda v: 0.0 <= v <= 1.0), "in [0, 1]")

# Ranges the types cannot say. Without them a bad value passes the parse and fails later inside a rank (batch_size 0
# in the sampler, total_steps -5 as a loop that never runs, grad_clip 0 zeroing every gradient). For a list, each item.
BOUNDS: dict[str, tuple[Callable[[float], bool], str]] = {
    **{f"model.{k}": at_least(1) for k in ("in_channels", "patch_size", "num_blocks", "dim", "num_heads",
                                           "text_tokens", "text_dims", "pooled_dim", "vae_downsample", "max_res",
                                           "max_res_orig")},
    "model.hidden_scale": above(0),
    "data.batch_size": at_least(1),
    "data.min_bucket_size": at_least(0),
    "data.long_caption_prob": PROBABILITY,
    "data.drop_article_prob": PROBABILITY,
    "data.strip_punctuation_prob": PROBABILITY,
    "data.decode_threads": at_least(0),
    "encoders.cpu_threads": at_least(0),
    "topology.loaders_per_node": at_least(1),
    "topology.models_per_loader": at_least(1),
    "topology.timeout_minutes": above(0),
    "topology.max_in_flight": at_least(1),
    "train.total_steps": at_least(1),
    "train.accumulation_steps": at_least(1),
    "train.lr": above(0),
    "train.betas": ((lambda v: 0.0 <= v < 1.0), "in [0, 1)"),
    "train.eps": above(0),
    "train.weight_decay": at_least(0),
    "train.warmup_steps": at_least(0),
    "train.lr_decay_fraction": ((lambda v: 0.0 < v <= 1.0), "in (0, 1]"),
    "train.grad_clip": above(0),
    "train.null_prob_pooled": PROBABILITY,
    "train.null_prob_gemma": PROBABILITY,
    "train.null_prob_bert": PROBABILITY,
    "train.timestep_std": above(0),
    "train.ema_update_every": at_least(1),
    "train.ema_decay": PROBABILITY,
    "train.save_every": at_least(1),
    "train.log_every": at_least(1),
    "train.max_nonfinite": at_least(1),
    "train.num_threads": at_least(0),
    "sample.num_steps": at_least(1),
    "sample.cfg_scale": at_least(0),
    "sample.width": at_least(16),
    "sample.height": at_least(16),
    "sample.batch_size": at_least(1),
    "sample.seed": at_least(-1),
}


def check_ranges(cfg: Config, source: str = "") -> None:
    """Every BOUNDS entry, and the few rules that tie two keys together; the first failure is raised."""
    where = f"{source}: " if source else ""
    for dotted, (ok, expected) in BOUNDS.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        for item in value if isinstance(value, list) else [value]:
            if not ok(item):
                raise ConfigError(f"{where}config key '{dotted}' is {value!r}, expected {expected}")
    model = cfg.model
    if model.dim % model.num_heads:
        raise ConfigError(f"{where}config key 'model.dim' is {model.dim}, not a multiple of model.num_heads "
                          f"({model.num_heads})")
    if model.positional_encoding == "RoPE2d" and (model.dim // model.num_heads) % 4:
        raise ConfigError(f"{where}model.positional_encoding 'RoPE2d' needs a head dim (model.dim / model.num_heads "
                          f"= {model.dim // model.num_heads}) divisible by 4")
    if cfg.train.text_loss_weight > 0 and not model.text_loss:
        raise ConfigError(f"{where}train.text_loss_weight is {cfg.train.text_loss_weight} but model.text_loss is "
                          "false: the text loss needs the text head (set model.text_loss=true)")
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"{where}config key 'train.betas' is {cfg.train.betas!r}, expected two numbers")
