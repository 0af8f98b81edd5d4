"""Text encoders on the tiny models: the context/pooled contract the model ranks rely on."""

from __future__ import annotations

import dataclasses

import torch

from sd3.encoders.text import TextEncoders

CAPTIONS = ["A red circle in the top left of a blue background.", "green star", ""]


def test_shapes_dtypes_and_parts(text_encoders, tiny_cfg):
    context, pooled = text_encoders.encode(CAPTIONS)
    T, D = tiny_cfg.model.text_tokens, tiny_cfg.model.context_dim
    assert context.shape == (3, 2 * T, D) and context.dtype == torch.float32
    assert pooled.shape == (3, tiny_cfg.model.pooled_dim) and pooled.dtype == torch.float32
    assert text_encoders.parts == {"gemma": slice(0, T), "bert": slice(T, 2 * T)}
    assert text_encoders.text_dims == tiny_cfg.model.text_dims
    assert not context.requires_grad and not any(p.requires_grad for p in text_encoders.gemma.parameters())
    assert not text_encoders.bert.training


def test_bf16_dtype(tiny_cfg):
    enc = dataclasses.replace(tiny_cfg.encoders, text_dtype="bf16")
    context, pooled = TextEncoders.load(enc, 8, "cpu").encode(CAPTIONS[:2])
    assert context.dtype == pooled.dtype == torch.bfloat16
    assert context.shape == (2, 16, tiny_cfg.model.context_dim)


def test_padded_positions_are_zero(text_encoders, tiny_cfg):
    T = tiny_cfg.model.text_tokens
    captions = ["green star", "a " * 100 + "circle"]  # short, and longer than T tokens (truncated)
    context, _ = text_encoders.encode(captions)
    gemma_len = len(text_encoders.gemma_tokenizer("green star")["input_ids"])  # <bos> green star
    bert_len = len(text_encoders.bert_tokenizer("green star")["input_ids"])  # [CLS] green star [SEP]
    gemma, bert = context[:, text_encoders.parts["gemma"]], context[:, text_encoders.parts["bert"]]
    assert (gemma[0, :gemma_len].abs().sum(-1) > 0).all() and (gemma[0, gemma_len:] == 0).all()
    assert (bert[0, :bert_len, :32].abs().sum(-1) > 0).all() and (bert[0, bert_len:] == 0).all()
    assert (bert[:, :, 32:] == 0).all()  # ModernBERT's 32 features zero-padded to the context width
    assert (context[1].abs().sum(-1) > 0).sum() == 2 * T  # the truncated caption fills both parts


def test_same_captions_same_outputs(text_encoders, tiny_cfg):
    first = text_encoders.encode(CAPTIONS)
    again = TextEncoders.load(tiny_cfg.encoders, tiny_cfg.model.text_tokens, "cpu").encode(CAPTIONS)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


def test_clip_pools_at_end_of_text(text_encoders):
    """The pooled vector is CLIP's projection of the hidden state at the caption's <|endoftext|>, not a pad."""
    clip, tok = text_encoders.clip, text_encoders.clip_tokenizer
    assert clip.config.eos_token_id == tok.eos_token_id != 2  # != 2: transformers pools at the first eos id
    captions = ["red circle", "a much longer caption about a purple diamond at the bottom"]
    _, pooled = text_encoders.encode(captions)
    tokens = tok(captions, padding="longest", return_tensors="pt")
    with torch.inference_mode():
        hidden = clip.text_model(**tokens).last_hidden_state  # (B, L, W), after the final layer norm
    end = tokens["attention_mask"].sum(1) - 1  # the <|endoftext|> of each caption
    assert (tokens["input_ids"][torch.arange(2), end] == tok.eos_token_id).all()
    expected = clip.text_projection(hidden[torch.arange(2), end])
    torch.testing.assert_close(pooled, expected)
    # Padding to a longer batch must not move the pooling position.
    alone = text_encoders.encode(captions[:1])[1]
    torch.testing.assert_close(alone[0], pooled[0], atol=1e-5, rtol=1e-5)
