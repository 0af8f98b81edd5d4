"""Parameter count and estimated training FLOPs per image (the nanoGPT / PaLM-appendix estimate).

Training FLOPs = 6 · (matmul weights each token passes through, summed over tokens) + attention, where
forward+backward is 3× the forward's 2 FLOPs per multiply-add. Softmax attention adds 12·Sq·Sk·D per block
(QKᵀ and A·V, forward and backward; less with qk_half_dim / kv_merge_attn, see attention_flops).
Norms, activations and biases are left out, as is usual.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sd3.config import ModelConfig

TIME_FREQUENCY_DIM = 256  # sd3.model.layers.TimestepEmbedding default


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass(frozen=True)
class MatmulWeights:
    """Weights of the matmuls (Linear / Conv) of an MMDiT, grouped by what they are applied to."""

    image: int  # per image token: patch embedding, image stream of every block, head
    text_gemma: int  # per Gemma token: its projection
    text_bert: int  # per ModernBERT token: its projection
    text: int  # per text token: text stream of every block
    sample: int  # once per image: time / pooled embeddings, conditioning and modulation layers

    @property
    def total(self) -> int:
        return self.image + self.text_gemma + self.text_bert + self.text + self.sample


def matmul_weights(cfg: ModelConfig) -> MatmulWeights:
    D, blocks = cfg.dim, cfg.num_blocks
    hidden = int(D * cfg.hidden_scale)
    mlp = (3 if cfg.mlp_type == "swiglu" else 2) * D * hidden
    patch = cfg.in_channels * cfg.patch_size**2
    qk = D // 2 if cfg.qk_half_dim else D  # width of the q and k projections
    stream = (2 * qk + D) * D + D * D + mlp  # fused QKV, out-projection, MLP
    full = blocks if cfg.text_loss else blocks - 1  # blocks with a full text path; the last one otherwise only
    image = patch * D + D * D + blocks * stream + D * patch  # projects text keys and values
    text = full * stream + (blocks - full) * (qk + D) * D + (D * cfg.context_dim if cfg.text_loss else 0)
    head = 2 * D * D + (0 if cfg.head_modulation == "seed" else D * D)
    modulation = full * 12 * D * D + (blocks - full) * (6 + 2) * D * D + head
    time = D * D if cfg.time_embedding == "seed" else TIME_FREQUENCY_DIM * D
    sample = time + cfg.pooled_dim * D + blocks * D * D + modulation
    return MatmulWeights(image, cfg.text_dims[0] * D, cfg.text_dims[1] * D, text, sample)


def attention_flops(cfg: ModelConfig, n: int, s: int, full: bool) -> float:
    """Forward+backward attention FLOPs of one block: n image tokens, s = n + text tokens; `full`: text queries too.

    Softmax: QKᵀ (width Dqk) and A·V (width D), 2 FLOPs per multiply-add, ×3 for forward+backward. Cosine is
    linear attention: kᵀv then q·(kᵀv), per head Dqk·Dh multiply-adds per key and per query.
    """
    qk = cfg.dim // 2 if cfg.qk_half_dim else cfg.dim
    keys = s // 2 if cfg.kv_merge_attn else s
    queries = s if full else n
    if cfg.attention == "cosine":
        head_dim = cfg.dim // cfg.num_heads
        return 6.0 * (keys + queries) * qk * head_dim
    return 6.0 * queries * keys * (qk + cfg.dim)


def image_tokens(cfg: ModelConfig, height: int, width: int) -> int:
    """Patches of a height×width px image; both must be multiples of patch·vae_downsample (16 px)."""
    multiple = cfg.patch_size * cfg.vae_downsample
    for name, size in (("height", height), ("width", width)):
        if size % multiple:
            raise ValueError(f"{name} {size} px is not a multiple of {multiple} px")
    return (height // multiple) * (width // multiple)


def train_flops_per_image(cfg: ModelConfig, height: int, width: int) -> float:
    """Estimated FLOPs of one forward+backward for one height×width px image."""
    n, t = image_tokens(cfg, height, width), cfg.text_tokens
    w = matmul_weights(cfg)
    per_token = w.image * n + (w.text_gemma + w.text_bert) * t + w.text * 2 * t + w.sample
    s = n + 2 * t
    last_full = cfg.text_loss  # without a text head the last block has only image queries
    attention = (cfg.num_blocks - 1) * attention_flops(cfg, n, s, True) + attention_flops(cfg, n, s, last_full)
    return float(6 * per_token + attention)
