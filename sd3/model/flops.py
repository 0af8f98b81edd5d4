"""Parameter count and estimated training FLOPs per image (the nanoGPT / PaLM-appendix estimate).

Training FLOPs = 6 · (matmul weights each token passes through, summed over tokens) + attention, where
forward+backward is 3× the forward's 2 FLOPs per multiply-add. Attention adds 12·Sq·Sk·D per block
(QKᵀ and A·V, forward and backward). Norms, activations and biases are left out, as is usual.
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
    stream = 4 * D * D + mlp  # fused QKV, out-projection, MLP
    image = patch * D + D * D + blocks * stream + D * patch
    text = (blocks - 1) * stream + 2 * D * D  # the last block only projects text keys and values
    modulation = (blocks - 1) * 12 * D * D + (6 + 2) * D * D + 2 * D * D  # blocks, last block, head
    sample = TIME_FREQUENCY_DIM * D + cfg.pooled_dim * D + (blocks + 1) * D * D + modulation
    return MatmulWeights(image, cfg.text_dims[0] * D, cfg.text_dims[1] * D, text, sample)


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
    attention = 12 * cfg.dim * ((cfg.num_blocks - 1) * s * s + n * s)  # the last block has only image queries
    return float(6 * per_token + attention)
