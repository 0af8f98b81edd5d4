"""Trimmed text encoding (encoders.trim_text): length-sorted micro-batches give the untrimmed outputs, for less work.

Equality is checked on the tiny encoders and on one real-width random block stack of each encoder (Gemma-2-2b 2304
wide, ModernBERT-large 1024, Meta-CLIP-L text 768), built from their transformers config classes with the tiny
tokenizers (the vocabulary size does not change a block's arithmetic).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    ModernBertConfig,
    ModernBertModel,
)

from sd3.data.synthetic import captions as shape_captions
from sd3.data.synthetic import sample_labels
from sd3.encoders.text import (
    AUTO_MICRO_BATCH,
    TextEncoders,
    length_sorted_chunks,
    padded_tokens,
    resolve_micro_batch,
)
from sd3.encoders.tiny import bert_tokenizer, clip_tokenizer, gemma_tokenizer

# Lengths differ a lot within the batch (1 to ~40 words), so micro-batches of 2 pad far less than the whole batch.
MIXED = ["red", "A red circle in the top left of a blue background.", "", "green star, bottom right",
         "The image shows a small yellow triangle placed near the centre of a plain black background " * 2,
         "blue square", "purple diamond at the bottom of a white background"]


def with_micro_batch(encoders: TextEncoders, micro_batch: int) -> TextEncoders:
    """The same loaded models, encoding with another micro-batch size (0 = untrimmed)."""
    other = copy.copy(encoders)
    other.micro_batch = micro_batch
    return other


def assert_same_encoding(encoders: TextEncoders, captions: list[str], micro_batch: int, atol: float,
                         rtol: float) -> None:
    context, pooled = with_micro_batch(encoders, 0).encode(captions)  # (B, 2T, D), (B, P)
    trimmed_context, trimmed_pooled = with_micro_batch(encoders, micro_batch).encode(captions)
    assert trimmed_context.shape == context.shape and trimmed_pooled.shape == pooled.shape
    assert torch.equal(trimmed_context == 0, context == 0)  # the same positions are padding, exactly zero
    torch.testing.assert_close(trimmed_context, context, atol=atol, rtol=rtol)
    torch.testing.assert_close(trimmed_pooled, pooled, atol=atol, rtol=rtol)


def test_chunks_are_length_sorted_and_cover_every_row():
    chunks = length_sorted_chunks([3, 9, 1, 9, 5], 2)
    assert [c.tolist() for c in chunks] == [[1, 3], [4, 0], [2]]
    assert padded_tokens([3, 9, 1, 9, 5], 2) == 2 * 9 + 2 * 5 + 1 * 1
    assert padded_tokens([3, 9, 1, 9, 5]) == 5 * 9  # untrimmed: every caption padded to the longest
    assert padded_tokens([], 4) == 0


def test_trim_is_on_by_default(text_encoders, tiny_cfg):
    assert tiny_cfg.encoders.trim_text and tiny_cfg.encoders.text_micro_batch == 0
    assert text_encoders.micro_batch == AUTO_MICRO_BATCH  # sized to each step


def test_auto_micro_batch_scales_with_the_step():
    """About 8 forwards per step, never below 16 captions: the presets' loader steps (batch x 3 consumers)."""
    assert resolve_micro_batch(0, 420) == 53 and resolve_micro_batch(0, 120) == 16
    assert resolve_micro_batch(0, 45) == 16 and resolve_micro_batch(0, 3) == 16
    assert resolve_micro_batch(64, 45) == 64  # an explicit size is kept
    lengths = np.random.default_rng(0).integers(5, 70, 45)  # a 1024 px step's captions
    assert padded_tokens(lengths, resolve_micro_batch(0, 45)) < 0.8 * padded_tokens(lengths)


@pytest.mark.parametrize("micro_batch", [1, 2, 3, 64])
def test_tiny_trimmed_equals_padded(text_encoders, micro_batch):
    assert_same_encoding(text_encoders, MIXED, micro_batch, atol=1e-5, rtol=1e-5)


def test_tiny_trimmed_equals_padded_on_shapes_captions(text_encoders):
    rng = np.random.default_rng(0)
    pairs = [shape_captions(sample_labels(rng), rng) for _ in range(24)]
    for column in (0, 1):  # recaption, recaption_short
        assert_same_encoding(text_encoders, [p[column] for p in pairs], 5, atol=1e-5, rtol=1e-5)


def real_width_encoders(dtype: torch.dtype, layers: int = 2) -> TextEncoders:
    """Real-width random blocks of the three encoders (Gemma-2-2b, ModernBERT-large, Meta-CLIP-L text)."""
    torch.manual_seed(0)
    clip_tok, gemma_tok, bert_tok = clip_tokenizer(), gemma_tokenizer(), bert_tokenizer()
    gemma = Gemma2Model(Gemma2Config(  # 2b widths; the defaults' layer types alternate sliding and full attention
        vocab_size=len(gemma_tok), num_hidden_layers=layers, pad_token_id=gemma_tok.pad_token_id,
        attn_implementation="eager"))
    bert = ModernBertModel(ModernBertConfig(
        vocab_size=len(bert_tok), hidden_size=1024, intermediate_size=2624, num_attention_heads=16,
        num_hidden_layers=layers, pad_token_id=bert_tok.pad_token_id, cls_token_id=bert_tok.cls_token_id,
        sep_token_id=bert_tok.sep_token_id, bos_token_id=bert_tok.cls_token_id, eos_token_id=bert_tok.sep_token_id))
    clip = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=768, intermediate_size=3072, num_attention_heads=12,
        num_hidden_layers=layers, projection_dim=768, max_position_embeddings=77,
        pad_token_id=clip_tok.pad_token_id, bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id))
    models = [m.to(dtype).eval().requires_grad_(False) for m in (clip, gemma, bert)]
    return TextEncoders(models[0], clip_tok, models[1], gemma_tok, models[2], bert_tok, 77, torch.device("cpu"))


@pytest.fixture(scope="module")
def real_fp32() -> TextEncoders:
    return real_width_encoders(torch.float32)


def test_real_width_trimmed_equals_padded_fp32(real_fp32):
    assert real_fp32.text_dims == [2304, 1024] and real_fp32.pooled_dim == 768
    assert_same_encoding(real_fp32, MIXED, 2, atol=2e-5, rtol=1e-4)


def test_real_width_trimmed_equals_padded_bf16():
    # bf16 has 8 mantissa bits: GEMMs of another shape round differently, so compare at bf16's resolution.
    assert_same_encoding(real_width_encoders(torch.bfloat16, layers=1), MIXED[:5], 2, atol=3e-2, rtol=2e-2)


def text_flops(encoders: TextEncoders, lengths: list[int]) -> int:
    """FLOPs of one encode() of captions with these token counts (Gemma, ModernBERT and CLIP together)."""
    captions = [" ".join(["red"] * max(0, n - 2)) for n in lengths]  # "red" is one token; <bos>/[CLS]..[SEP] add 1-2
    with FlopCounterMode(display=False) as counter:
        encoders.encode(captions)
    return counter.get_total_flops()


def test_trimmed_flops_follow_the_token_count(real_fp32):
    """Trimming saves at least the padded token positions' share of the FLOPs (attention saves a little more)."""
    lengths = [4, 4, 5, 6, 30, 31, 33]
    untrimmed = text_flops(with_micro_batch(real_fp32, 0), lengths)
    trimmed = text_flops(with_micro_batch(real_fp32, 2), lengths)
    token_ratio = padded_tokens(lengths, 2) / padded_tokens(lengths)
    assert trimmed < untrimmed
    assert trimmed / untrimmed == pytest.approx(token_ratio, abs=0.05)


def step_flops(lengths: np.ndarray, micro_batch: int, cost: tuple[float, float]) -> float:
    """FLOPs of one encoder over a step's captions: per forward, rows x (a L + c L^2) at the forward's length L."""
    a, c = cost
    if micro_batch <= 0:
        return float(len(lengths) * (a * lengths.max() + c * lengths.max() ** 2))
    return float(sum(len(r) * (a * lengths[r].max() + c * lengths[r].max() ** 2)
                     for r in length_sorted_chunks(lengths, micro_batch)))


def report_flops_saved(batch: int = 420, micro_batch: int = 64, seed: int = 0) -> dict:
    """FLOPs saved by trimming at the reference size: `python tests/encoders/test_trim.py` prints the JSON.

    Per encoder, one real-width block's cost is fitted as a L + c L^2 per caption of L tokens (linear layers + the
    attention matrices; FlopCounterMode at L = 8 and 16 determines both exactly) and weighted by the real models'
    block counts (Gemma-2-2b 26, ModernBERT-large 28, Meta-CLIP-L text 12). Two caption mixes of `batch` captions a
    step (420 = the source's 256 px global batch): the shapes captions (tiny tokenizers), and recaption ~60 /
    recaption_short ~15 tokens, normal with sd = mean / 4, clipped to [3, 77], long or short per step 50/50 (as
    data.long_caption_prob chooses).
    """
    enc = real_width_encoders(torch.float32, layers=1)
    blocks = {"gemma": (enc.gemma, 26), "bert": (enc.bert, 28), "clip": (enc.clip, 12)}
    costs = {}
    for name, (model, _) in blocks.items():
        flops = []
        for n in (8, 16):
            with FlopCounterMode(display=False) as counter, torch.inference_mode():
                model(input_ids=torch.full((1, n), 5), attention_mask=torch.ones(1, n, dtype=torch.long))
            flops.append(counter.get_total_flops())
        c = (flops[1] - 2 * flops[0]) / (16 ** 2 - 2 * 8 ** 2)  # f(L) = a L + c L^2
        costs[name] = ((flops[0] - c * 64) / 8, c)
    rng = np.random.default_rng(seed)
    pairs = [shape_captions(sample_labels(rng), rng) for _ in range(batch)]
    tokenizers = {"gemma": enc.gemma_tokenizer, "bert": enc.bert_tokenizer, "clip": enc.clip_tokenizer}

    def mix_report(steps: list[dict[str, np.ndarray]]) -> dict:
        out = {}
        for mode, mb in (("full_T", None), ("untrimmed", 0), ("trimmed", micro_batch)):
            total = 0.0
            for lengths in steps:
                for name, (_, layers) in blocks.items():
                    ls = np.full_like(lengths[name], 77) if mb is None else lengths[name]
                    total += layers * step_flops(ls, mb or 0, costs[name])
            out[f"{mode}_tflops_per_step"] = round(total / len(steps) / 1e12, 3)
        out["saved_vs_untrimmed"] = round(1 - out["trimmed_tflops_per_step"] / out["untrimmed_tflops_per_step"], 3)
        out["saved_vs_full_T"] = round(1 - out["trimmed_tflops_per_step"] / out["full_T_tflops_per_step"], 3)
        return out

    shapes = [{n: np.array([len(t(p[col], max_length=77, truncation=True)["input_ids"]) for p in pairs])
               for n, t in tokenizers.items()} for col in (0, 1)]
    specials = {"gemma": 1, "bert": 2, "clip": 2}  # <bos>; [CLS] [SEP]; <|startoftext|> <|endoftext|>
    realistic = []
    for mean in (60, 15):
        words = np.clip(np.rint(rng.normal(mean, mean / 4, batch)), 1, 77).astype(np.int64)
        realistic.append({n: np.minimum(words + s, 77) for n, s in specials.items()})
    return {"batch": batch, "micro_batch": micro_batch, "shapes": mix_report(shapes),
            "recaption_60_short_15": mix_report(realistic)}


if __name__ == "__main__":
    import json

    print(json.dumps(report_flops_saved()))


def test_bench_balance_times_trimming_on_the_plans_caption_mix(tiny_cfg):
    """The check `sd3 bench balance` reports: the same captions untrimmed and trimmed through the same encoders,
    with the planner's token ratio for exactly those captions (tiny encoders here; real-width 1-layer ones there)."""
    from sd3.bench.balance import TEXT_PARTS, trimming_on_the_plan_mix

    out = trimming_on_the_plan_mix(tiny_cfg, rows=8, micro_batch=2, repeats=1)
    for part in TEXT_PARTS:
        assert out[f"{part}_s_untrimmed"] > 0 and out[f"{part}_s_trimmed"] > 0
        assert 0.5 < out[f"{part}_token_ratio"] < 1.0  # lengths spread by 25 %: trimming removes some padding
        # The planner's trimmed time: the untrimmed step less its one forward's fixed cost scales with the token
        # positions; 8 captions in micro-batches of 2 pay the fixed cost 4 times. (No order of the two times is
        # asserted: on a busy machine one run of the one-token forward can take longer than the step.)
        untrimmed, overhead = out[f"{part}_s_untrimmed"], out[f"{part}_s_one_token"]
        assert overhead > 0
        assert out[f"{part}_s_trimmed_predicted"] == pytest.approx(
            max(0.0, untrimmed - overhead) * out[f"{part}_token_ratio"] + 4 * overhead)
