"""Everything `sd3 sample` (and the Pipeline) can check before a model loads, each failure one line naming the culprit.

A user error is a ConfigError (the cli prints its one line and exits 2): a bad number, an unknown sampler, a missing
or unreadable init image, a checkpoint path that is not one, a config.json or weights file that cannot be read. They
are checked here, cheaply (a weights file's safetensors header, not its tensors), so a typo costs no model load.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open

from sd3.config import Config
from sd3.config_loader import apply_override, config_from_dict
from sd3.errors import ConfigError
from sd3.sample.samplers import SAMPLERS
from sd3.train.checkpoint import resolve_checkpoint

SIZE_MULTIPLE = 16  # VAE /8 then patch 2: every pixel side must be a multiple of 16


def check_size(width: int, height: int, max_res: int | None = None) -> None:
    """ConfigError for sides that are not multiples of 16; a warning above the resolution the model was trained at."""
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % SIZE_MULTIPLE:
            raise ConfigError(f"{name} {value} is not a positive multiple of {SIZE_MULTIPLE} (VAE /8 x patch 2)")
    if max_res is not None and max(width, height) > max_res:
        warnings.warn(f"{width}x{height} is above the resolution this checkpoint was trained at ({max_res}); "
                      "expect repeated or broken structure", stacklevel=3)


@dataclass
class Settings:
    """The sampling settings a call may set; None = the checkpoint's [sample] value. Checked by `check_settings`."""

    num_steps: int | None = None
    sampler: str | None = None
    cfg_scale: float | None = None
    shift: float | None = None
    strength: float | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int | None = None


def check_settings(s: Settings) -> None:
    """One ConfigError naming the first bad setting; unset (None) settings are not checked."""
    if s.num_steps is not None and s.num_steps < 1:
        raise ConfigError(f"steps {s.num_steps} must be >= 1")
    if s.sampler is not None and s.sampler not in SAMPLERS:
        raise ConfigError(f"sampler '{s.sampler}' is not one of {', '.join(SAMPLERS)}")
    if s.cfg_scale is not None and not math.isfinite(s.cfg_scale):
        raise ConfigError(f"cfg {s.cfg_scale} must be a finite number")
    if s.shift is not None and not (math.isfinite(s.shift) and s.shift > 0):
        raise ConfigError(f"shift {s.shift} must be > 0 (1 = the unshifted schedule)")
    if s.strength is not None and not 0.0 <= s.strength <= 1.0:
        raise ConfigError(f"strength {s.strength} must be in [0, 1] (0 = the init image itself, 1 = pure noise)")
    if s.batch_size is not None and s.batch_size < 1:
        raise ConfigError(f"batch-size {s.batch_size} must be >= 1")
    if s.width is not None or s.height is not None:
        check_size(SIZE_MULTIPLE if s.width is None else s.width, SIZE_MULTIPLE if s.height is None else s.height)


def open_image(path: str | Path) -> Image.Image:
    """An init image as RGB, or a ConfigError naming the file that is missing or not an image."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"init image {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(f"init image {path} is not a readable image ({e})") from None


def find_checkpoint(checkpoint: str | Path) -> Path:
    """A checkpoint directory itself, or a save_dir whose `latest` file names one; a ConfigError otherwise."""
    path = Path(checkpoint)
    if (path / "config.json").is_file():
        return path
    try:
        found = resolve_checkpoint(str(path)) if path.exists() else None
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ConfigError(f"checkpoint {checkpoint}: {e}") from None
    if found is None:
        raise ConfigError(f"no checkpoint at {checkpoint} (expected a step-XXXXXXXX dir with config.json, "
                          "or a save_dir with a 'latest' file)")
    return Path(found)


def read_config(path: Path) -> Config:
    """A checkpoint's config.json as a Config; a ConfigError naming the file when it is not valid JSON."""
    file = path / "config.json"
    try:
        tree = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not a readable config ({str(e).splitlines()[0]})") from None
    return config_from_dict(tree, source=str(file))


def weights_file(path: Path, use_ema: bool) -> Path:
    """The checkpoint's weights file to load, checked: present and a readable safetensors header (no tensor read)."""
    file = path / ("ema.safetensors" if use_ema else "model.safetensors")
    if not file.is_file():
        raise ConfigError(f"{file} is missing (ema.safetensors by default, model.safetensors with the raw weights)")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{file}: not a readable .safetensors file ({str(e).splitlines()[0]})") from None
    return file


@dataclass
class Checkpoint:
    """A checked checkpoint: its directory, its config (with the overrides applied) and the weights file to load."""

    path: Path
    cfg: Config
    weights: Path


def open_checkpoint(checkpoint: str | Path, use_ema: bool = True, overrides: list[str] | tuple[str, ...] = ()
                    ) -> Checkpoint:
    """Everything about a checkpoint that can fail, checked without loading a model (see the module docstring)."""
    path = find_checkpoint(checkpoint)
    cfg = read_config(path)
    for item in overrides:
        apply_override(cfg, item)
    return Checkpoint(path, cfg, weights_file(path, use_ema))
