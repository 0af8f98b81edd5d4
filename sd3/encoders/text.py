"""The frozen text encoders of a loader rank: Gemma-2 and ModernBERT hidden states (context), Meta-CLIP pooled.

context (B, 2T, D): tokens [0, T) are Gemma-2's last hidden state, tokens [T, 2T) ModernBERT's, each tokenized to
at most T tokens (right padding, truncation); ModernBERT's features are zero-padded to D = max(widths), and every
padded token position is zero. pooled (B, P): CLIP's text projection at the end-of-text token (source README:
Meta-CLIP is used only for the pooled vector, the other two for the sequence).

Trimmed encoding (encoders.trim_text): a step's captions are tokenized once, sorted by token count and run in
micro-batches of `micro_batch` captions (AUTO_MICRO_BATCH: sized to the step, `resolve_micro_batch`), each padded
only to its own longest caption; the outputs are scattered back
into the fixed layout. Gemma-2 is causal and right-padded, ModernBERT and CLIP mask padded keys and CLIP pools at
the end-of-text token, so a real token's state does not depend on how much padding follows it: the result equals the
untrimmed one up to floating-point reassociation, at `padded_tokens(lengths, micro_batch)` tokens of work instead of
len(lengths) x max(lengths).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    CLIPTextModelWithProjection,
    Gemma2Model,
    ModernBertModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sd3.config import EncodersConfig
from sd3.devices import resolve_device
from sd3.encoders.hub import load_pretrained, resolve_dtype
from sd3.encoders.timing import timed


def load_tokenizer(key: str, path: str) -> PreTrainedTokenizerBase:
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, key, path)
    tokenizer.padding_side = "right"  # Gemma's tokenizer pads on the left by default; the context layout needs right
    return tokenizer


AUTO_MICRO_BATCH = -1  # TextEncoders.micro_batch: size the micro-batches to each step (encoders.text_micro_batch 0)
TEXT_CHUNKS = 8  # auto: a step's captions in about this many length-sorted forwards
MIN_TEXT_MICRO_BATCH = 16  # auto: never fewer captions per forward (16 x ~60 tokens: GEMMs a GPU still fills)


def resolve_micro_batch(setting: int, rows: int) -> int:
    """Captions per trimmed forward in a step of `rows` captions: `setting` when > 0, else (auto) rows / TEXT_CHUNKS
    rounded up, at least MIN_TEXT_MICRO_BATCH. A fixed size would leave small steps (1024 px: 45 captions a loader
    step at 15 x 3) in one forward, padded to their longest, saving nothing; the length spread within each of ~8
    sorted chunks is small whatever the step's size."""
    return setting if setting > 0 else max(MIN_TEXT_MICRO_BATCH, math.ceil(rows / TEXT_CHUNKS))


def length_sorted_chunks(lengths: Sequence[int], micro_batch: int) -> list[np.ndarray]:
    """Row indices sorted by length, longest first, cut into micro-batches of at most `micro_batch` rows."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")  # (B,)
    return [order[i:i + micro_batch] for i in range(0, len(order), max(1, micro_batch))]


def padded_tokens(lengths: Sequence[int], micro_batch: int = 0) -> int:
    """Token positions an encoder computes for captions of these token counts: padded to the longest of the whole
    batch when micro_batch <= 0 (untrimmed), else to the longest of each length-sorted micro-batch (trimmed)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return 0
    if micro_batch <= 0:
        return int(len(lengths) * lengths.max())
    return int(sum(len(rows) * lengths[rows].max() for rows in length_sorted_chunks(lengths, micro_batch)))


def frozen(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    model.requires_grad_(False)
    return model.eval().to(device)


class TextEncoders:
    """Gemma-2 + ModernBERT (context) and CLIP (pooled), frozen, in eval mode, run under inference_mode.

    text_tokens: T, tokens per part. `parts` maps "gemma"/"bert" to their token slices in the context, so CFG
    dropout can zero one part. micro_batch: captions per forward of trimmed encoding, AUTO_MICRO_BATCH to size them
    to each step; 0 = untrimmed (one forward per encoder, padded to the batch's longest caption). Build with
    `TextEncoders.load(cfg.encoders, cfg.model.text_tokens, device)`.
    """

    def __init__(self, clip: CLIPTextModelWithProjection, clip_tokenizer: PreTrainedTokenizerBase,
                 gemma: Gemma2Model, gemma_tokenizer: PreTrainedTokenizerBase,
                 bert: ModernBertModel, bert_tokenizer: PreTrainedTokenizerBase,
                 text_tokens: int, device: torch.device, micro_batch: int = 0) -> None:
        self.clip, self.clip_tokenizer = clip, clip_tokenizer
        self.gemma, self.gemma_tokenizer = gemma, gemma_tokenizer
        self.bert, self.bert_tokenizer = bert, bert_tokenizer
        self.text_tokens = text_tokens
        self.device = device
        self.dtype = gemma.dtype
        self.text_dims = [gemma.config.hidden_size, bert.config.hidden_size]
        self.context_dim = max(self.text_dims)
        self.pooled_dim = clip.text_projection.out_features
        self.parts = {"gemma": slice(0, text_tokens), "bert": slice(text_tokens, 2 * text_tokens)}
        # CLIP reads its own window (77 for Meta-CLIP), independent of T: only its pooled vector is used.
        self.clip_tokens = clip.config.max_position_embeddings
        self.micro_batch = micro_batch

    @classmethod
    def load(cls, cfg: EncodersConfig, text_tokens: int, device: torch.device | str = "auto") -> TextEncoders:
        device = resolve_device(device)
        dtype = resolve_dtype(cfg.text_dtype)
        clip = load_pretrained(CLIPTextModelWithProjection.from_pretrained, "encoders.clip", cfg.clip, dtype=dtype)
        # transformers 5 runs Gemma-2 with eager attention only (its logit soft-capping is not in SDPA).
        gemma = load_pretrained(Gemma2Model.from_pretrained, "encoders.gemma", cfg.gemma, dtype=dtype,
                                attn_implementation="eager")
        bert = load_pretrained(ModernBertModel.from_pretrained, "encoders.bert", cfg.bert, dtype=dtype)
        return cls(
            frozen(clip, device), load_tokenizer("encoders.clip", cfg.clip),
            frozen(gemma, device), load_tokenizer("encoders.gemma", cfg.gemma),
            frozen(bert, device), load_tokenizer("encoders.bert", cfg.bert),
            text_tokens, device, (cfg.text_micro_batch or AUTO_MICRO_BATCH) if cfg.trim_text else 0,
        )

    def tokenize(self, tokenizer: PreTrainedTokenizerBase, captions: list[str], max_length: int) -> dict:
        # Pad to the longest caption of the batch, not to max_length: short captions cost less, and the
        # padded positions are zeroed (and padded to T) afterwards anyway.
        tokens = tokenizer(captions, padding="longest", max_length=max_length, truncation=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}

    def micro_batches(self, tokenizer: PreTrainedTokenizerBase, captions: list[str],
                      max_length: int) -> list[tuple[np.ndarray, dict]]:
        """(rows, tokens) per forward: the whole batch when untrimmed, else length-sorted micro-batches, each
        right-padded with the tokenizer's pad id to its own longest caption, as `tokenize` pads a whole batch."""
        if self.micro_batch <= 0:
            return [(np.arange(len(captions)), self.tokenize(tokenizer, captions, max_length))]
        ids = tokenizer(captions, max_length=max_length, truncation=True)["input_ids"]  # B lists of token ids
        lengths = np.array([len(i) for i in ids], dtype=np.int64)  # (B,)
        batches = []
        for rows in length_sorted_chunks(lengths, resolve_micro_batch(self.micro_batch, len(ids))):
            longest = int(lengths[rows[0]])
            # Built in numpy, one tensor per micro-batch: per-row torch ops cost more than a tiny encoder's forward.
            input_ids = np.full((len(rows), longest), tokenizer.pad_token_id, dtype=np.int64)  # (b, L)
            for k, row in enumerate(rows):
                input_ids[k, :lengths[row]] = ids[row]
            mask = (np.arange(longest)[None, :] < lengths[rows][:, None]).astype(np.int64)  # (b, L)
            tokens = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
            batches.append((rows, {k: v.to(self.device) for k, v in tokens.items()}))
        return batches

    def hidden(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, captions: list[str]) -> torch.Tensor:
        """Last hidden state, padded positions zeroed, padded to T tokens and to D features: (B, T, D)."""
        out = torch.zeros(len(captions), self.text_tokens, self.context_dim, dtype=self.dtype, device=self.device)
        for rows, tokens in self.micro_batches(tokenizer, captions, self.text_tokens):
            states = model(**tokens).last_hidden_state  # (b, L, width), L <= T
            states = states * tokens["attention_mask"].unsqueeze(-1).to(states.dtype)
            out[torch.as_tensor(rows, device=self.device), :states.shape[1], :states.shape[2]] = states
        return out  # (B, T, D)

    def pooled(self, captions: list[str]) -> torch.Tensor:
        """CLIP's text projection at each caption's first end-of-text token: (B, P)."""
        out = torch.zeros(len(captions), self.pooled_dim, dtype=self.dtype, device=self.device)
        for rows, tokens in self.micro_batches(self.clip_tokenizer, captions, self.clip_tokens):
            out[torch.as_tensor(rows, device=self.device)] = self.clip(**tokens).text_embeds  # (b, P)
        return out  # (B, P)

    @torch.inference_mode()
    def encode(self, captions: list[str], timings: dict[str, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> context (B, 2T, D), pooled (B, P), in the encoders' dtype on their device.

        timings: when given, seconds spent per part ("gemma", "bert", "clip") are added to it.
        """
        with timed(timings, "gemma", self.device):
            gemma = self.hidden(self.gemma, self.gemma_tokenizer, captions)  # (B, T, D)
        with timed(timings, "bert", self.device):
            bert = self.hidden(self.bert, self.bert_tokenizer, captions)  # (B, T, D)
        with timed(timings, "clip", self.device):
            pooled = self.pooled(captions)  # (B, P)
        return torch.cat([gemma, bert], dim=1), pooled  # (B, 2T, D), (B, P)
