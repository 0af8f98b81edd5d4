"""Attention: the softmax backend dispatch (flash-attn -> xformers -> torch SDPA) and the source's cosine attention.

All kernels take and return (B, S, H, d) tensors — the layout flash-attn and xformers use natively; for SDPA the
(B, H, S, d) view is a free transpose. q and k may be narrower than v (`model.qk_half_dim`). The backend is chosen
once per module and logged once per backend. `model.attention_backend` = auto | flash | xformers | sdpa; forcing
one that cannot run here is a build-time error.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F

from sd3.errors import UnavailableError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flash", "xformers", "sdpa")
KINDS = ("softmax", "cosine")
_logged: set[str] = set()


class BackendError(UnavailableError):
    """A forced attention backend that cannot run here: a user error (the cli prints it as one line, exit 2)."""


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None and torch.cuda.is_available()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)  # (B, Sq, H, Dv)


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_func  # optional GPU dependency: imported only where it runs

    return flash_attn_func(q, k, v, softmax_scale=scale)  # (B, Sq, H, Dv)


def xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention  # optional GPU dependency

    return memory_efficient_attention(q, k, v, scale=scale)  # (B, Sq, H, Dv)


KERNELS = {"flash": flash, "xformers": xformers, "sdpa": sdpa}
AVAILABLE = {"flash": flash_available, "xformers": xformers_available, "sdpa": lambda: True}
# flash-attn and xformers' fused kernels need one head dim for q, k and v; SDPA (math / efficient) does not.
SAME_HEAD_DIM = ("flash", "xformers")


def check_backend(name: str, kind: str = "softmax", qk_dim: int = 0, v_dim: int = 0) -> None:
    """Raise at build time when `name` is unknown or cannot run here with these head dims / attention kind."""
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend '{name}' is not one of {', '.join(BACKENDS)}")
    if kind not in KINDS:
        raise ValueError(f"model.attention '{kind}' is not one of {', '.join(KINDS)}")
    if name == "auto":
        return
    if kind == "cosine":
        raise BackendError(f"model.attention_backend='{name}' was forced but model.attention='cosine' is linear "
                           "attention with no softmax kernel; use model.attention_backend=auto")
    if name in SAME_HEAD_DIM and qk_dim != v_dim:
        raise BackendError(f"model.attention_backend='{name}' was forced but its kernel needs equal q/k and v head "
                           f"dims and model.qk_half_dim gives {qk_dim} vs {v_dim}; use sdpa or auto")
    if not AVAILABLE[name]():
        package = {"flash": "flash-attn", "xformers": "xformers"}[name]
        raise BackendError(
            f"model.attention_backend='{name}' was forced but {package} is not importable or CUDA is not available; "
            "install the gpu extra on a CUDA machine or use model.attention_backend=auto"
        )


def resolve_backend(name: str, q: torch.Tensor, v_dim: int | None = None) -> str:
    """The backend that runs for `q`: the forced one, or the fastest one that supports its device, dtype and head
    dims (`v_dim` defaults to q's)."""
    if name != "auto":
        return name
    same_dim = v_dim is None or v_dim == q.shape[-1]
    on_gpu_half = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if on_gpu_half and same_dim and AVAILABLE["flash"]():
        return "flash"
    if q.is_cuda and same_dim and AVAILABLE["xformers"]():
        return "xformers"
    return "sdpa"


def to_autocast_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast to the autocast dtype when autocast is on for the tensors' device, else return them unchanged.

    CUDA autocast runs rms_norm / layer_norm in fp32, so q/k leave the QK-norm in fp32: without this cast the
    dispatch sees fp32, never picks flash-attn, and every recompute keeps fp32 copies (CPU autocast keeps bf16,
    which is why CPU runs never showed it).
    """
    device = tensors[0].device.type
    if not torch.amp.is_autocast_available(device) or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def reference_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v in plain einsums, (B, S, H, d) layout."""
    weights = (torch.einsum("bqhd,bkhd->bhqk", q, k) * scale).softmax(dim=-1)  # (B, H, Sq, Sk)
    return torch.einsum("bhqk,bkhe->bqhe", weights, v)  # (B, Sq, H, Dv)


def cosine(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, norm_const: torch.Tensor) -> torch.Tensor:
    """The source's non-causal cosine attention (SEED_SPEC §a): out_i = Σ_j (q̂_i·k̂_j) v_j / L^σ(a_h).

    q̂, k̂ are L2-normalised per head; L is the key length (after a kv merge); a = `norm_const` (H,) is learnt.
    There is no row normalisation, so weights can be negative. Computed as q̂·(k̂ᵀ·v): linear in the sequence.
    """
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    length = k.shape[1]
    divisor = torch.pow(float(length), torch.sigmoid(norm_const.float())).to(v.dtype)  # (H,)
    kv = torch.einsum("bkhd,bkhe->bhde", k, v / divisor[:, None])  # (B, H, Dqk, Dv)
    return torch.einsum("bqhd,bhde->bqhe", q, kv)  # (B, Sq, H, Dv)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto", kind: str = "softmax",
              norm_const: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Sq, H, Dqk), k (B, Sk, H, Dqk), v (B, Sk, H, Dv) -> (B, Sq, H, Dv).

    Softmax attention uses scale Dv^-½: the source's, also with narrower q/k (`qk_half_dim`, SEED_SPEC §d), and
    1/√Dh otherwise. `kind="cosine"` needs `norm_const` (H,).
    """
    if kind == "cosine":
        return cosine(q, k, v, norm_const)
    scale = v.shape[-1] ** -0.5
    if q.shape[0] == 0:
        # flash-attn rejects batch 0 (an all-skipped step reaches the model); plain maths on empty tensors is free
        # and keeps the graph connected, so backward still gives every weight a (zero) gradient for DDP.
        return reference_softmax(q, k, v, scale)
    chosen = resolve_backend(backend, q, v.shape[-1])
    if chosen not in _logged and not torch.compiler.is_compiling():
        _logged.add(chosen)
        log.info("attention backend: %s (requested %s, device %s)", chosen, backend, q.device.type)
    return KERNELS[chosen](q, k, v, scale)
