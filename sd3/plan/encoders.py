"""The real loader-side models, built from their published configurations (shipped in sd3/plan/configs/*.json).

Each JSON file records the hub id and file its values came from, the library class that reads them, and the values
themselves, so `sd3 plan` and `sd3 bench gpu` build the real architectures offline with random weights (or on the
meta device, with no weights at all). A configured local folder (the tiny models, a downloaded copy) is read
instead of the shipped file, so a plan of `tiny-cpu` counts the tiny models. `layers` builds a reduced-depth
copy of the same width, for timing on a CPU.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    ModernBertConfig,
    ModernBertModel,
    PretrainedConfig,
)

from sd3.config import EncodersConfig
from sd3.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"
TEXT_PARTS = ("gemma", "bert", "clip")
PARTS = (*TEXT_PARTS, "vae")
FILES = {
    "gemma": "gemma-2-2b.json",
    "bert": "modernbert-large.json",
    "clip": "metaclip-l14-400m-text.json",
    "vae": "flux1-schnell-vae.json",
}
# (config class, model class) of each text part: the classes sd3/encoders/text.py loads from the hub.
TEXT_CLASSES: dict[str, tuple[type[PretrainedConfig], type[nn.Module]]] = {
    "gemma": (Gemma2Config, Gemma2Model),
    "bert": (ModernBertConfig, ModernBertModel),
    "clip": (CLIPTextConfig, CLIPTextModelWithProjection),
}


@dataclass(frozen=True)
class PartSpec:
    """One shipped configuration file: which part, where its values came from, and the values."""

    part: str
    hub_id: str
    file: str
    class_name: str
    values: dict[str, Any]


def load_spec(part: str) -> PartSpec:
    if part not in FILES:
        raise ValueError(f"unknown loader part '{part}' (one of {', '.join(PARTS)})")
    raw = json.loads((CONFIG_DIR / FILES[part]).read_text())
    return PartSpec(raw["part"], raw["hub_id"], raw["file"], raw["class"], raw["config"])


def local_folder(part: str, encoders: EncodersConfig | None) -> Path | None:
    """The configured local folder of `part` (None: use the shipped file).

    A hub id other than the shipped one is an error: its architecture is not known offline.
    """
    if encoders is None:
        return None
    path = getattr(encoders, part)
    folder = Path(path) / (encoders.vae_subfolder if part == "vae" else "")
    if (folder / "config.json").is_file():
        return folder
    spec = load_spec(part)
    if path != spec.hub_id:
        raise ConfigError(f"encoders.{part}: '{path}' is neither a local model folder nor {spec.hub_id}, whose "
                          f"configuration ships in sd3/plan/configs/{FILES[part]} (tiny models: `sd3 make-tiny`)")
    return None


TIMING_VOCAB = 4096  # vocabulary of reduced-depth timing copies (text_config)


def text_config(part: str, layers: int | None = None, folder: Path | None = None,
                timing_copy: bool = False) -> PretrainedConfig:
    """The library config of a text part (shipped, or read from a local `folder`); `layers` overrides
    num_hidden_layers (None: the real depth). timing_copy (with `layers`): also cap the vocabulary at TIMING_VOCAB,
    for a copy that is only timed: the token ids run are zeros and an embedding lookup costs no FLOPs, while
    Gemma-2's full table (256k x 2304, 590M parameters) would take most of a CPU timing run to initialise."""
    config_class, _ = TEXT_CLASSES[part]
    if folder is not None:
        config = config_class.from_pretrained(folder)
        if layers is None:
            values = None
        else:
            values = config.to_dict()
    else:
        values = dict(load_spec(part).values)
    if values is not None:
        if layers is not None:
            values["num_hidden_layers"] = layers
            values.pop("layer_types", None)  # Gemma-2 derives its per-layer attention types from the depth
        if layers is not None and timing_copy:
            values["vocab_size"] = min(values["vocab_size"], TIMING_VOCAB)
            for key in ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id",
                        "mask_token_id"):  # special ids must stay inside the table (the ids run are zeros anyway)
                if isinstance(values.get(key), int) and values[key] >= TIMING_VOCAB:
                    values[key] = TIMING_VOCAB - 1
        config = config_class(**values)
    if part == "gemma":
        # As TextEncoders.load: transformers 5 runs Gemma-2 with eager attention (soft-capping is not in SDPA).
        config._attn_implementation = "eager"
    return config


def vae_kwargs(layers: int | None = None, folder: Path | None = None) -> dict[str, Any]:
    """AutoencoderKL keyword arguments of the FLUX.1 VAE (or of a local `folder`); `layers` overrides
    layers_per_block."""
    if folder is not None:
        raw = json.loads((folder / "config.json").read_text())
        values = {k: v for k, v in raw.items() if not k.startswith("_")}  # diffusers' bookkeeping keys
    else:
        values = dict(load_spec("vae").values)
    if layers is not None:
        values["layers_per_block"] = layers
    return values


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build parameters directly in `dtype`: a 2.6B-parameter Gemma in fp32 first would need twice the memory."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_part(part: str, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32,
               layers: int | None = None, folder: Path | None = None) -> nn.Module:
    """The frozen module a loader runs for `part` (random weights; none at all on the meta device), in eval mode.

    The VAE is only its encoder half (diffusers' AutoencoderKL, imported here because only the VAE needs diffusers:
    `sd3 bench gpu` must run where diffusers is missing, and then skips the VAE).
    """
    with torch.device(device), default_dtype(dtype):
        if part == "vae":
            from diffusers import AutoencoderKL

            vae = AutoencoderKL(**vae_kwargs(layers, folder))
            vae.decoder = None  # loaders never decode (sd3/encoders/vae.py drops it too)
            vae.post_quant_conv = None
            model: nn.Module = vae
        else:
            # A reduced-depth copy is only ever timed (sd3 plan --measure, sd3 bench gpu --tiny)
            model = TEXT_CLASSES[part][1](text_config(part, layers, folder, timing_copy=layers is not None))
    model.requires_grad_(False)
    return model.eval()


def run_part(part: str, model: nn.Module, batch: int, tokens: int, height: int, width: int) -> torch.Tensor:
    """One loader forward of `part` on `batch` inputs: `tokens` token ids (text) or a height×width image (VAE).

    No attention mask is passed: every caption is taken at the full `tokens` length (the most a loader pays), and
    ModernBERT's unpadding path reads the mask with .item(), which meta tensors cannot do.
    """
    device = next(model.parameters()).device
    if part == "vae":
        dtype = next(model.parameters()).dtype
        images = torch.zeros(batch, 3, height, width, device=device, dtype=dtype)  # (B, 3, H, W)
        return model.encode(images).latent_dist.mean  # (B, 16, H/8, W/8)
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)  # (B, T)
    out = model(input_ids=ids)
    return out.text_embeds if part == "clip" else out.last_hidden_state
