"""The source's checkpoints (gmongaras/Stable-Diffusion-3-From-Scratch, SEED_SPEC §g) -> our MMDiT's weights.

The source saves `model_ema_{S}s.pkl` (a torch.save'd plain state_dict) and `model_params_{S}s.json` (its
constructor arguments). `model_config(params)` gives the ModelConfig that holds the same network — with the options
that reproduce the source's time embedding, final layer and unscaled RoPE2d — and `convert(state, cfg)` renames,
concatenates and permutes its tensors into our state_dict (biases the source lacks are zero):

- q/k rows and q/k norm weights are permuted per head from the source's interleaved RoPE pairs (2i, 2i+1) to our
  rotate-half pairs (i, i + d/4) within each half of the head dim (d/2 for 1D RoPE), which changes no logit;
- the six adaLN projections of each stream are concatenated in our chunk order (shift1, scale1, gate1, ...);
- the BERT projection keeps its first 1024 columns and its norm weight is scaled by √(2304/1024): the source
  RMS-normalises the zero-padded 2304-wide vector, we the 1024 real channels;
- the output rows move from the source's channel order c·p² + ph·p + pw to ours (ph·p + pw)·C + c.

Pure tensor code: reading the files and writing our checkpoint are in sd3/commands/import_seed.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from sd3.config import ModelConfig
from sd3.errors import ConfigError

SEED_TEXT_TOKENS = 77  # per encoder part, fixed in the source
SEED_TEXT_DIMS = [2304, 1024]  # Gemma-2-2B, ModernBERT-large (zero-padded to 2304 in the source's context)
# Source keys with no counterpart: RoPE frequencies (ours are computed) and the last block's unused text query.
IGNORED_SUFFIXES = ("attn.rotary_emb.freqs", "attn.rotary_emb.inv_freq")
ATTENTION = {"softmax": "softmax", "softmax_flash": "softmax", "cosine": "cosine"}
MLPS = {"swiglu": ".MLP", "swiglu_old": ""}  # MLP_type -> the key level above w12 / w3
POSITIONS = ("RoPE2d", "RoPE", "NoPE")


class SeedCheckpointError(ConfigError):
    """A source checkpoint this converter cannot map exactly; the message is one line and names the culprit."""


def model_config(params: dict[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig of a source `model_params_{S}s.json` (SEED_SPEC §g), on top of `base` (default ModelConfig)."""
    attn_type = params.get("attn_type", "softmax")
    mlp_type = params.get("MLP_type", "swiglu_old")  # the source's own default for a json without it
    position = params.get("positional_encoding", "RoPE2d")
    if attn_type not in ATTENTION:
        raise SeedCheckpointError(f"attn_type '{attn_type}' is not converted (supported: {', '.join(ATTENTION)})")
    if mlp_type == "gelu":
        raise SeedCheckpointError("MLP_type 'gelu' is not converted: the source's GELU is exact (erf), ours tanh")
    if mlp_type not in MLPS:
        raise SeedCheckpointError(f"MLP_type '{mlp_type}' is unknown (supported: {', '.join(MLPS)})")
    if position not in POSITIONS:
        raise SeedCheckpointError(f"positional_encoding '{position}' is not converted exactly (supported: "
                                  f"{', '.join(POSITIONS)}; absolute and RoPE2dV2 differ in construction)")
    try:
        sizes = {"in_channels": int(params["inCh"]), "pooled_dim": int(params["class_dim"]),
                 "patch_size": int(params["patch_size"]), "dim": int(params["dim"]),
                 "num_heads": int(params["num_heads"]), "num_blocks": int(params["num_blocks"]),
                 "hidden_scale": float(params["hidden_scale"])}
    except KeyError as e:
        raise SeedCheckpointError(f"model_params json lacks '{e.args[0]}'") from None
    return dataclasses.replace(
        base or ModelConfig(), **sizes,
        mlp_type="swiglu", attention=ATTENTION[attn_type], positional_encoding=position,
        max_res=int(params.get("max_res", 256)), max_res_orig=int(params.get("max_res_orig", 256)),
        kv_merge_attn=bool(params.get("kv_merge_attn", False)), qk_half_dim=bool(params.get("qk_half_dim", False)),
        text_loss=bool(params.get("text_loss", False)),
        text_tokens=SEED_TEXT_TOKENS, text_dims=list(SEED_TEXT_DIMS),
        time_embedding="seed", head_modulation="seed",
        # The source's RoPE2d never divided positions by max_res / max_res_orig; its 1D RoPE did (SEED_SPEC §b).
        rope_interpolate=position != "RoPE2d",
    )


def pair_permutation(qk_dim: int, positional_encoding: str) -> torch.Tensor:
    """Index `perm` with new[j] = old[perm[j]] that maps the source's interleaved rotary pairs to rotate-half."""
    if positional_encoding == "NoPE":
        return torch.arange(qk_dim)
    groups = 2 if positional_encoding == "RoPE2d" else 1  # RoPE2d: row half, column half
    size = qk_dim // groups
    inner = torch.cat([torch.arange(0, size, 2), torch.arange(1, size, 2)])  # [0, 2, 4, ..., 1, 3, 5, ...]
    return torch.cat([g * size + inner for g in range(groups)])


def head_permutation(channels: int, patch: int) -> torch.Tensor:
    """Rows of our head: ours (ph·p + pw)·C + c takes the source's row c·p² + ph·p + pw."""
    ph_pw, c = torch.meshgrid(torch.arange(patch * patch), torch.arange(channels), indexing="ij")
    return (c * patch * patch + ph_pw).flatten()


class _Reader:
    """Takes tensors out of the source state_dict by name, so leftovers can be reported."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state, self.used = state, set()

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise SeedCheckpointError(f"source state_dict lacks '{key}' (does model_params json match the weights?)")
        self.used.add(key)
        return self.state[key].float()

    def drop(self, key: str) -> None:
        self.used.add(key)

    def leftovers(self) -> list[str]:
        return sorted(k for k in self.state.keys() - self.used if not k.endswith(IGNORED_SUFFIXES))


def convert(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Source state_dict -> our state_dict for `cfg` (from model_config), fp32. Every source tensor is used or named
    in IGNORED_SUFFIXES; a leftover is an error."""
    get, out = _Reader(state), {}
    D, H = cfg.dim, cfg.num_heads
    qk_dim = D // H // 2 if cfg.qk_half_dim else D // H
    perm = pair_permutation(qk_dim, cfg.positional_encoding)
    mlp_level = MLPS["swiglu"] if any(".MLP_x.MLP." in k for k in state) else MLPS["swiglu_old"]

    def linear(ours: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        out[f"{ours}.weight"] = weight
        out[f"{ours}.bias"] = torch.zeros(weight.shape[0]) if bias is None else bias

    def heads(weight: torch.Tensor) -> torch.Tensor:  # (H·Dqk, ...) rows permuted within each head
        return weight.unflatten(0, (H, qk_dim))[:, perm].flatten(0, 1)

    out["time_embed.time_scale"] = get("time_scale").reshape(1)
    out["time_embed.proj.weight"] = get("t_emb2.weight")
    linear("pooled_embed", get("cond_MLP.weight"))
    d_bert = cfg.text_dims[1]
    for i, (norm, scalar, proj, width) in enumerate((("pre_c_norm", "learnable_scalar", "c_proj", None),
                                                     ("pre_c_norm2", "learnable_scalar2", "c_proj2", d_bert))):
        norm_w, proj_w = get(f"{norm}.weight"), get(f"{proj}.weight")
        if width is not None:  # RMS over the padded width vs over the real one: factor √(padded / real)
            norm_w, proj_w = norm_w[:width] * math.sqrt(norm_w.shape[0] / width), proj_w[:, :width]
        out[f"text_embed.{i}.norm.weight"] = norm_w
        out[f"text_embed.{i}.scale"] = get(scalar).reshape(1)
        linear(f"text_embed.{i}.proj", proj_w)
    out["patch_embed.conv.weight"] = get("pos_enc.proj.weight")
    out["patch_embed.conv.bias"] = torch.zeros(D)
    linear("patch_embed.proj", get("patch_emb.weight"), get("patch_emb.bias"))

    for b in range(cfg.num_blocks):
        src, ours = f"blocks.{b}", f"blocks.{b}"
        last = b == cfg.num_blocks - 1 and not cfg.text_loss
        linear(f"{ours}.cond", get(f"{src}.y_proj.0.weight"), get(f"{src}.y_proj.0.bias"))
        for s in ("x", "c"):
            full = s == "x" or not last
            names = [f"norm1_{s}.c_shift", f"norm1_{s}.c_scale"]
            names += [f"scale1_{s}", f"norm2_{s}.c_shift", f"norm2_{s}.c_scale", f"scale2_{s}"] if full else []
            linear(f"{ours}.mod_{s}.linear", torch.cat([get(f"{src}.{n}.weight") for n in names]))
            attn = f"{src}.attn"
            q_w, k_w, v_w = (f"{attn}.{n}_proj_{s}.weight" for n in ("query", "key", "value"))
            rows = ([heads(get(q_w))] if full else []) + [heads(get(k_w)), get(v_w)]
            if not full:  # the source computes the last block's text queries and throws them away
                get.drop(q_w)
            linear(f"{ours}.qkv_{s}", torch.cat(rows))
            if cfg.attention == "softmax":
                for n in ("q", "k"):
                    key = f"{attn}.{n}_norm_{s}.weight"
                    if n == "q" and not full:
                        get.drop(key)
                    else:
                        out[f"{ours}.{n}_norm_{s}.weight"] = get(key)[perm]
            if full:
                linear(f"{ours}.out_{s}", get(f"{attn}.out_proj_{s}.weight"))
                mlp = f"{src}.MLP_{s}{mlp_level}"
                linear(f"{ours}.mlp_{s}.w13", get(f"{mlp}.w12.weight"), get(f"{mlp}.w12.bias"))
                linear(f"{ours}.mlp_{s}.w2", get(f"{mlp}.w3.weight"), get(f"{mlp}.w3.bias"))
        if cfg.attention == "cosine":
            out[f"{ours}.norm_const"] = get(f"{src}.attn.norm_const").reshape(H)

    linear("head_mod.linear", torch.cat([get("out_norm.c_shift.weight"), get("out_norm.c_scale.weight")]))
    rows = head_permutation(cfg.in_channels, cfg.patch_size)
    linear("head", get("out_proj.weight")[rows], get("out_proj.bias")[rows])
    if cfg.text_loss:
        linear("text_head", get("out_text_proj.weight"), get("out_text_proj.bias"))
    leftovers = get.leftovers()
    if leftovers:
        raise SeedCheckpointError(f"source tensors with no place in the converted model: {', '.join(leftovers[:5])}"
                                  f"{' ...' if len(leftovers) > 5 else ''}")
    return out
