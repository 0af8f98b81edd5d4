"""The frozen text encoders of a loader rank: Gemma-2 and ModernBERT hidden states (context), Meta-CLIP pooled.

context (B, 2T, D): tokens [0, T) are Gemma-2's last hidden state, tokens [T, 2T) ModernBERT's, each tokenized to
at most T tokens (right padding, truncation); ModernBERT's features are zero-padded to D = max(widths), and every
padded token position is zero. pooled (B, P): CLIP's text projection at the end-of-text token (source README:
Meta-CLIP is used only for the pooled vector, the other two for the sequence).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def frozen(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    model.requires_grad_(False)
    return model.eval().to(device)


class TextEncoders:
    """Gemma-2 + ModernBERT (context) and CLIP (pooled), frozen, in eval mode, run under inference_mode.

    text_tokens: T, tokens per part. `parts` maps "gemma"/"bert" to their token slices in the context, so CFG
    dropout can zero one part. Build with `TextEncoders.load(cfg.encoders, cfg.model.text_tokens, device)`.
    """

    def __init__(self, clip: CLIPTextModelWithProjection, clip_tokenizer: PreTrainedTokenizerBase,
                 gemma: Gemma2Model, gemma_tokenizer: PreTrainedTokenizerBase,
                 bert: ModernBertModel, bert_tokenizer: PreTrainedTokenizerBase,
                 text_tokens: int, device: torch.device) -> None:
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
            text_tokens, device,
        )

    def tokenize(self, tokenizer: PreTrainedTokenizerBase, captions: list[str], max_length: int) -> dict:
        # Pad to the longest caption of the batch, not to max_length: short captions cost less, and the
        # padded positions are zeroed (and padded to T) afterwards anyway.
        tokens = tokenizer(captions, padding="longest", max_length=max_length, truncation=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}

    def hidden(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, captions: list[str]) -> torch.Tensor:
        """Last hidden state, padded positions zeroed, padded to T tokens and to D features: (B, T, D)."""
        tokens = self.tokenize(tokenizer, captions, self.text_tokens)
        states = model(**tokens).last_hidden_state  # (B, L, width), L <= T
        states = states * tokens["attention_mask"].unsqueeze(-1).to(states.dtype)
        length, width = states.shape[1], states.shape[2]
        return F.pad(states, (0, self.context_dim - width, 0, self.text_tokens - length))  # (B, T, D)

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
            tokens = self.tokenize(self.clip_tokenizer, captions, self.clip_tokens)
            pooled = self.clip(**tokens).text_embeds  # (B, P), read at the first end-of-text token
        return torch.cat([gemma, bert], dim=1), pooled  # (B, 2T, D), (B, P)
