"""Attention backend dispatch: flash-attn (installed, tensors on CUDA) -> xformers -> torch SDPA.

All backends take and return (B, S, H, Dh) tensors — the layout flash-attn and xformers use natively; for SDPA
the (B, H, S, Dh) view is a free transpose. The choice is made once per module and logged once per backend.
`model.attention_backend` = auto | flash | xformers | sdpa; forcing one that cannot run here is a build-time error.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F

from sd3.errors import UnavailableError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "flash", "xformers", "sdpa")
_logged: set[str] = set()


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None and torch.cuda.is_available()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, S, Dh)
    return out.transpose(1, 2)  # (B, S, H, Dh)


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v)  # (B, S, H, Dh)


def xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention

    return memory_efficient_attention(q, k, v)  # (B, S, H, Dh)


KERNELS = {"flash": flash, "xformers": xformers, "sdpa": sdpa}
AVAILABLE = {"flash": flash_available, "xformers": xformers_available, "sdpa": lambda: True}


def check_backend(name: str) -> None:
    """Raise at build time when `name` is unknown or cannot run on this machine."""
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend '{name}' is not one of {', '.join(BACKENDS)}")
    if name != "auto" and not AVAILABLE[name]():
        package = {"flash": "flash-attn", "xformers": "xformers"}[name]
        raise UnavailableError(
            f"model.attention_backend='{name}' was forced but {package} is not importable or CUDA is not available; "
            "install the gpu extra on a CUDA machine or use model.attention_backend=auto"
        )


def resolve_backend(name: str, q: torch.Tensor) -> str:
    """The backend that runs for `q`: the forced one, or the fastest one that supports its device and dtype."""
    if name != "auto":
        return name
    on_gpu_half = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if on_gpu_half and AVAILABLE["flash"]():
        return "flash"
    if q.is_cuda and AVAILABLE["xformers"]():
        return "xformers"
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(Dh). q (B, Sq, H, Dh), k and v (B, Sk, H, Dh) -> (B, Sq, H, Dh)."""
    chosen = resolve_backend(backend, q)
    if chosen not in _logged:
        _logged.add(chosen)
        log.info("attention backend: %s (requested %s, device %s)", chosen, backend, q.device.type)
    return KERNELS[chosen](q, k, v)
