"""Rectified-flow training math: noising, timestep sampling, velocity target, loss, CFG dropout.

Conventions (ARCHITECTURE §3; Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution
Image Synthesis" (SD3), §2-3; the source README "Model Details"):

    x_t = (1 - t) * x0 + t * eps        t in [0, 1], t = 1 is pure noise
    v   = d x_t / dt = eps - x0         the regression target of the model
    t   = sigmoid(n), n ~ N(m, s^2)     logit-normal sampling, SD3 §3.1 (m=0, s=1 was best, "lognorm(0.00, 1.00)")

Every random draw takes an explicit torch.Generator so a resumed run replays the same noise and masks.
The functions are pure and work with any velocity model, so they are tested with a stand-in model.
`training_loss` is the whole objective of one micro-batch — drop conditioning, draw t and noise, predict,
loss — used by the trainer and both benchmarks (bench pipeline, bench learn), so they measure one objective.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sd3.batch import Batch
from sd3.config import Config

# model(x_t, t, context, pooled) -> predicted velocity: the MMDiT, its DDP / compiled wrapper, or a stand-in.
VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so a per-sample scalar broadcasts over the rest of `like`."""
    return t.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def sample_timesteps(
    n: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """Logit-normal timesteps t = sigmoid(N(mean, std^2)), shape (n,), float32 on `device`.

    SD3 paper §3.1, eq. 19: the logit-normal density puts more weight on the middle of the path, where the
    velocity is hardest to predict. Drawn on the generator's device, then moved, so CPU generators work for
    CUDA tensors and the draw does not depend on where the model lives.
    """
    n_ = torch.randn(n, generator=generator, device=generator.device, dtype=torch.float32)  # (n,)
    return torch.sigmoid(mean + std * n_).to(device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t)·x0 + t·noise, with t (B,) broadcast over x0 (B, ...)."""
    t_ = _per_sample(t, x0)  # (B, 1, 1, 1)
    return (1.0 - t_) * x0 + t_ * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = noise - x0: the constant velocity of the straight path from x0 (t=0) to noise (t=1)."""
    return noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32 (the model may run under bf16 autocast).

    An empty batch gives a zero loss that is still connected to `pred`: a model rank that received 0 rows must
    still call backward so DDP's all-reduce sees a gradient from every rank (mean over 0 elements would be NaN).
    """
    if pred.shape != target.shape:
        raise ValueError(f"flow_loss: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.numel() == 0:
        return pred.float().sum() * 0.0
    return F.mse_loss(pred.float(), target.float())


def cfg_dropout(
    context: torch.Tensor,
    pooled: torch.Tensor,
    text_tokens: int,
    p_pooled: float,
    p_gemma: float,
    p_bert: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero whole conditioning parts per sample so the model also learns the unconditional velocity.

    context (B, 2*T, D): tokens [0, T) are the Gemma part, [T, 2T) the ModernBERT part; pooled (B, P).
    Each sample independently loses its pooled vector with p_pooled, its Gemma part with p_gemma and its BERT
    part with p_bert (source README: 0.1 / 0.316 / 0.316, so both text parts vanish together ~10% of the time).
    The null condition is all zeros, which is what a sampler passes as the unconditional input.
    Exactly 3·B uniforms are drawn whatever the probabilities, so the generator stream replays on resume.
    Returns new tensors; the inputs are not modified.
    """
    for name, p in (("p_pooled", p_pooled), ("p_gemma", p_gemma), ("p_bert", p_bert)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"cfg_dropout: {name}={p} is not a probability in [0, 1]")
    b = context.shape[0]
    if context.dim() != 3 or context.shape[1] != 2 * text_tokens:
        raise ValueError(
            f"cfg_dropout: context shape {tuple(context.shape)} is not (B, 2*text_tokens={2 * text_tokens}, D)"
        )
    if pooled.shape[0] != b:
        raise ValueError(f"cfg_dropout: pooled batch {pooled.shape[0]} != context batch {b}")

    u = torch.rand(b, 3, generator=generator, device=generator.device).to(context.device)  # (B, 3)
    drop = u < torch.tensor([p_pooled, p_gemma, p_bert], device=context.device)  # (B, 3) bool

    token_part = torch.arange(2 * text_tokens, device=context.device) >= text_tokens  # (2T,) False=Gemma, True=BERT
    drop_tokens = torch.where(token_part[None, :], drop[:, 2:3], drop[:, 1:2])  # (B, 2T)
    # where() rather than a multiply: a dropped part is exactly zero even if it held inf/NaN.
    context = torch.where(drop_tokens[:, :, None], torch.zeros((), dtype=context.dtype, device=context.device), context)
    pooled = torch.where(
        drop[:, 0:1].to(pooled.device), torch.zeros((), dtype=pooled.dtype, device=pooled.device), pooled
    )
    return context, pooled


def draw_path(x0: torch.Tensor, generator: torch.Generator, mean: float = 0.0,
              std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, noise) for the clean latents x0 (B, C, h, w): logit-normal t (B,), then Gaussian noise like x0.

    Drawn on the generator's device (a CUDA generator on a GPU: no host-to-device copy, no sync) in this order,
    so a stream replays exactly on resume.
    """
    t = sample_timesteps(x0.shape[0], generator, x0.device, mean, std)  # (B,)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(x0.device)
    return t, noise  # (B,), (B, C, h, w)


def velocity_loss(model: VelocityModel, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                  context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The flow-matching loss of `model` on the path point x_t between x0 and noise at t (fp32 scalar)."""
    x_t = add_noise(x0, noise, t)  # (B, C, h, w)
    pred = model(x_t, t, context, pooled)  # (B, C, h, w)
    return flow_loss(pred, velocity_target(x0, noise))


def training_loss(model: VelocityModel, batch: Batch, generator: torch.Generator, cfg: Config) -> torch.Tensor:
    """The training objective of one micro-batch (already on the model's device): CFG dropout of the
    conditioning, t and noise, prediction, loss. Run it under the precision's autocast.

    The generator's draws, in order: 3·B CFG uniforms, B timesteps, the noise (see cfg_dropout, draw_path), and
    with train.text_loss_weight > 0 then B·2T mask uniforms (text_loss_mask); the loss adds weight × text_loss.
    """
    tc = cfg.train
    # One memory layout whatever the source: the VAE returns channels-last latents, a cache or the transport
    # contiguous ones, and the kernels (hence the last bits of the loss) differ between them.
    x0 = batch.latents.contiguous()  # (B, C, h, w)
    context, pooled = cfg_dropout(
        batch.context.contiguous(), batch.pooled.contiguous(), cfg.model.text_tokens,
        tc.null_prob_pooled, tc.null_prob_gemma, tc.null_prob_bert, generator,
    )  # (B, 2T, D), (B, P)
    t, noise = draw_path(x0, generator, tc.timestep_mean, tc.timestep_std)  # (B,), (B, C, h, w)
    if tc.text_loss_weight <= 0:
        return velocity_loss(model, x0, t, noise, context, pooled)
    # The masked text regression (§e), drawn after t and noise so the flow part's stream is unchanged: hide some
    # tokens of the kept caption parts, predict the velocity and the hidden context from what is left.
    mask = text_loss_mask(kept_parts(context, cfg.model.text_tokens), cfg.model.text_tokens, generator)  # (B, 2T)
    v, text_pred = model(add_noise(x0, noise, t), t, hide_text(context, mask), pooled, return_text=True)
    return flow_loss(v, velocity_target(x0, noise)) + tc.text_loss_weight * text_loss(text_pred, context, mask)
# ---------------------------------------------------------------------------------------------- text loss (§e)
# The source's "NSP" text loss (SEED_SPEC §e) is a masked-token regression on the text-encoder embeddings: a text
# head on the last block's text stream predicts the context, and the loss is taken on the tokens that were hidden
# from the model.


def text_loss_mask(
    kept: torch.Tensor, text_tokens: int, generator: torch.Generator, p: float = 0.25
) -> torch.Tensor:
    """Which text tokens to hide and regress: (B, 2T) bool.

    kept (B, 2) bool: whether the sample's Gemma / BERT part survived CFG dropout (False = dropped to zeros).
    Each token is picked with probability p, and only in parts that were kept.

    Reading: the source ANDs the pick with the *dropped* flag, so it regresses only tokens of parts that are
    already all zeros, while its own comment says masked (dropped) text should get no loss. We implement the
    comment's intent — hide tokens of the caption the model was given and predict them from the rest, the
    masked-token regression the name describes; with the source's reading the mask changes no input, and the
    47% of samples that keep both parts (0.684²) get no text loss at all.
    Exactly B·2T uniforms are drawn whatever `kept` holds, so the generator stream replays on resume.
    """
    b = kept.shape[0]
    if kept.shape != (b, 2):
        raise ValueError(f"text_loss_mask: kept must be (B, 2) [gemma, bert], got {tuple(kept.shape)}")
    picked = torch.rand(b, 2 * text_tokens, generator=generator, device=generator.device).to(kept.device) < p
    part = (torch.arange(2 * text_tokens, device=kept.device) >= text_tokens).long()  # (2T,) 0 = Gemma, 1 = BERT
    return picked & kept[:, part]  # (B, 2T)


def kept_parts(context: torch.Tensor, text_tokens: int) -> torch.Tensor:
    """(B, 2) bool: whether each text part of `context` (B, 2T, D) is non-zero, i.e. survived cfg_dropout,
    which zeroes a dropped part exactly (a real encoder output is never all zeros)."""
    b = context.shape[0]
    return context.view(b, 2, text_tokens, -1).ne(0).flatten(2).any(dim=-1)  # (B, 2)


def hide_text(context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The model's input: `context` (B, 2T, D) with the masked tokens (B, 2T) set to zero (a new tensor)."""
    return torch.where(mask[:, :, None], torch.zeros((), dtype=context.dtype, device=context.device), context)


def text_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over all B·2T·D elements of (pred − target)²·mask, in fp32; target = the context before hiding.

    Divided by the element count, not the masked count, as the source does, so a `text_loss_weight` tuned there
    means the same here. An empty batch gives a zero loss connected to `pred` (see flow_loss).
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(f"text_loss: pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(mask.shape)} must be (B, 2T, D), (B, 2T, D), (B, 2T)")
    if pred.numel() == 0:
        return pred.float().sum() * 0.0
    return ((pred.float() - target.float()).square() * mask[:, :, None]).mean()
