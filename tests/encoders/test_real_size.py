"""The loader path at the real encoders' sizes (issue 14 item 6): Meta-CLIP-L/14, Gemma-2-2B (2 of 26 layers),
ModernBERT-large (2 of 28 layers) and the FLUX.1 VAE, random weights, written by tests/fixtures/real_size.py and read
back through the project's own loading code (encoders.* keys of the sd3-1b-256 preset -> Conditioner ->
TextEncoders.load / LatentVAE.load).

Slow: writing and reading Gemma's 590M-parameter embedding dominates (~1 min on the shared 2-core machine).
"""

import dataclasses

import numpy as np
import pytest
import torch
from fixtures.real_size import BERT_LAYERS, GEMMA_LAYERS, write_real_size

from sd3.config_loader import load_config
from sd3.data.batches import RawBatch
from sd3.encoders.conditioner import Conditioner
from sd3.model import build_model
from sd3.train.flow import training_loss

pytestmark = pytest.mark.slow

CAPTIONS = ["a small red circle in the top left corner of a plain white background", "blue star"]


@pytest.fixture(scope="module")
def real_models(tmp_path_factory):
    return write_real_size(tmp_path_factory.mktemp("real-size-models"))


@pytest.fixture(scope="module")
def real_cfg(real_models):
    # batch_dtype fp32 (the preset sends bf16): the trainer's batch.to(float32) is then a no-op, so the batch it
    # trains on is the Conditioner's own tensors, the case the inference-tensor test is about.
    return load_config("sd3-1b-256", [*real_models.overrides, "--encoders.batch_dtype=fp32"])


@pytest.fixture(scope="module")
def conditioner(real_cfg):
    return Conditioner(real_cfg, "cpu")


def real_batch(conditioner, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(len(CAPTIONS), 3, height, width, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    raw = RawBatch(images, list(CAPTIONS), np.arange(len(CAPTIONS)), {})
    return conditioner(raw, torch.Generator().manual_seed(seed))


def test_real_size_encoders_load_with_their_real_architectures(conditioner):
    text, vae = conditioner.text, conditioner.vae
    gemma, bert, clip = text.gemma.config, text.bert.config, text.clip.config
    assert type(text.gemma).__name__ == "Gemma2Model" and text.gemma.config._attn_implementation == "eager"
    assert (gemma.hidden_size, gemma.vocab_size, gemma.num_hidden_layers) == (2304, 256_000, GEMMA_LAYERS)
    assert gemma.layer_types == ["sliding_attention", "full_attention"]  # both of Gemma-2's attention kinds
    assert (bert.hidden_size, bert.vocab_size, bert.num_hidden_layers) == (1024, 50_368, BERT_LAYERS)
    assert type(text.clip).__name__ == "CLIPTextModelWithProjection"
    assert (clip.hidden_size, clip.num_hidden_layers, clip.projection_dim, clip.vocab_size) == (768, 12, 768, 49_408)
    assert text.gemma.dtype == torch.bfloat16  # encoders.text_dtype
    assert text.gemma.embed_tokens.weight.shape == (256_000, 2304)
    # The tiny offline tokenizers' ids must index the real embeddings.
    for tokenizer, model in ((text.gemma_tokenizer, text.gemma), (text.bert_tokenizer, text.bert),
                             (text.clip_tokenizer, text.clip)):
        assert max(tokenizer.get_vocab().values()) < model.get_input_embeddings().num_embeddings
    assert vae.vae.config.block_out_channels == [128, 256, 512, 512] and vae.vae.config.layers_per_block == 2
    assert (vae.latent_channels, vae.downsample, vae.scale, vae.shift) == (16, 8, 0.3611, 0.1159)
    assert not vae.has_decoder  # a loader rank's VAE
    assert (text.text_dims, text.context_dim, text.pooled_dim, text.clip_tokens) == ([2304, 1024], 2304, 768, 77)


@pytest.mark.parametrize("height, width", [(64, 64), (48, 80)], ids=["square", "wide"])
def test_real_size_conditioner_batch_shapes(conditioner, real_cfg, height, width):
    batch = real_batch(conditioner, height, width)
    B, T = len(CAPTIONS), real_cfg.model.text_tokens
    assert batch.context.shape == (B, 2 * T, 2304) == (B, 154, 2304)
    assert batch.pooled.shape == (B, 768)
    assert batch.latents.shape == (B, 16, height // 8, width // 8)
    for t in batch.tensors()[:3]:
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    gemma, bert = batch.context[:, :T], batch.context[:, T:]  # (B, T, 2304) each
    assert not bert[:, :, 1024:].any()  # ModernBERT is 1024 wide: its columns 1024..2303 are zero padding
    for part, tokenizer in ((gemma, conditioner.text.gemma_tokenizer), (bert, conditioner.text.bert_tokenizer)):
        for row, caption in enumerate(CAPTIONS):
            n = len(tokenizer(caption)["input_ids"])
            width_of_part = 2304 if part is gemma else 1024
            assert (part[row, :n, :width_of_part].abs().sum(-1) > 0).all()  # every real token has features
            assert not part[row, n:].any()  # padded token positions are zero
    assert (batch.pooled.abs().sum(-1) > 0).all() and not torch.equal(batch.pooled[0], batch.pooled[1])
    assert batch.latents.std() > 0.01


def test_real_size_batch_is_inference_tensors_clone_before_training(conditioner, real_cfg):
    """The trap: the Conditioner runs under torch.inference_mode, so its outputs are inference tensors, which
    autograd refuses to save for backward. Whatever trains on them directly must clone them first (outside
    inference mode), as the Validator does; the project's training_loss takes them as they come."""
    batch = real_batch(conditioner, 64, 64)
    assert all(t.is_inference() for t in batch.tensors())
    # A narrow MMDiT with the real encoders' input widths (16 latent channels, 2 x 77 x 2304 context, 768 pooled).
    model_cfg = dataclasses.replace(real_cfg.model, num_blocks=2, dim=64, num_heads=2, checkpoint_attn=False,
                                    checkpoint_mlp=False)
    model = build_model(model_cfg)
    t = torch.rand(len(batch))  # (B,)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        model(batch.latents, t, batch.context, batch.pooled).square().mean().backward()
    model.zero_grad(set_to_none=True)
    cloned = [x.clone() for x in (batch.latents, batch.context, batch.pooled)]  # outside inference mode
    assert not any(x.is_inference() for x in cloned)
    assert all(torch.equal(a, b) for a, b in zip(cloned, batch.tensors()[:3], strict=True))
    model(cloned[0], t, *cloned[1:]).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)

    # The trainer's path: batch.to(device, float32) (a no-op here: same device and dtype, still inference
    # tensors), then training_loss, whose CFG dropout and noising make new tensors before anything is saved.
    trained = batch.to("cpu", torch.float32)
    assert trained.context.is_inference() and trained.latents.is_inference()
    cfg = dataclasses.replace(real_cfg, model=model_cfg)
    loss = training_loss(model, trained, torch.Generator().manual_seed(0), cfg)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
