"""The two models of `sd3 recaption` (SEED_SPEC §i), both plain transformers classes, greedy and batched.

- `Captioner`: LLaVA-NeXT (LlavaNextForConditionalGeneration + LlavaNextProcessor). The source used
  `lmms-lab/llama3-llava-next-8b`, whose config declares model_type `llava_llama` (LlavaLlamaForCausalLM), a type
  transformers does not register (CONFIG_MAPPING has llava, llava_next, ... but no llava_llama): it needs the LLaVA-NeXT
  repository's own code. Its transformers-native conversion, `llava-hf/llama3-llava-next-8b-hf` (the same weights
  converted by transformers' convert_llava_next_weights_to_hf), is the default here.
- `Shortener`: a chat LLM (`meta-llama/Meta-Llama-3-8B-Instruct`, AutoModelForCausalLM) distils a caption into one
  sentence of at most 40 words.
Both read the HF token from `.env` (sd3/encoders/hub.py) for the gated Llama weights.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaNextForConditionalGeneration, LlavaNextProcessor

from sd3.encoders.hub import load_pretrained

DEFAULT_CAPTIONER = "llava-hf/llama3-llava-next-8b-hf"
DEFAULT_SHORTENER = "meta-llama/Meta-Llama-3-8B-Instruct"

# The source's captioning prompt, in our words: detailed but succinct; text and objects in detail; foreground and
# background; the alt-text as a hint that may be irrelevant.
CAPTION_PROMPT = (
    "Write a detailed but succinct caption of this image. Describe any text and the objects in detail, as well as "
    "the foreground and the background, and include any important text you can read. The image's alt-text is given "
    "as a hint; it may or may not be relevant: \"{hint}\""
)
SYSTEM_PROMPT = "You are a helpful assistant"
SHORTEN_PROMPT = (
    "Distil this image caption into a single sentence: remove redundancy and keep it to at most 40 words. "
    "Output only the caption.\n\nCaption: {caption}"
)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The source's image_aspect_ratio "pad": centre the image on a square of the processor's mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


class Captioner:
    """LLaVA-NeXT, `model_id` a hub id or a local folder; `__call__(images, hints) -> captions` (greedy)."""

    def __init__(self, model_id: str, device: torch.device, dtype: torch.dtype, max_new_tokens: int = 1024):
        self.processor = load_pretrained(LlavaNextProcessor.from_pretrained, "captioner", model_id)
        self.processor.tokenizer.padding_side = "left"  # generation continues every row from its last token
        self.model = load_pretrained(LlavaNextForConditionalGeneration.from_pretrained, "captioner", model_id,
                                     dtype=dtype).to(device).eval().requires_grad_(False)
        self.device, self.max_new_tokens = device, max_new_tokens
        mean = getattr(self.processor.image_processor, "image_mean", (0.5, 0.5, 0.5))
        self.fill = tuple(int(round(255 * m)) for m in mean)

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image], hints: list[str]) -> list[str]:
        prompts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT.format(hint=h)}]}],
            add_generation_prompt=True) for h in hints]
        squares = [pad_to_square(im.convert("RGB"), self.fill) for im in images]
        inputs = self.processor(images=squares, text=prompts, return_tensors="pt", padding=True).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                                  pad_token_id=self.processor.tokenizer.pad_token_id)  # (B, prompt + new)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class Shortener:
    """A chat LLM, `model_id` a hub id or a local folder; `__call__(captions) -> one-sentence captions` (greedy)."""

    def __init__(self, model_id: str, device: torch.device, dtype: torch.dtype, max_new_tokens: int = 96):
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, "shortener", model_id)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:  # Llama-3's tokenizer has none; padding is masked anyway
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_pretrained(AutoModelForCausalLM.from_pretrained, "shortener", model_id,
                                     dtype=dtype).to(device).eval().requires_grad_(False)
        self.device, self.max_new_tokens = device, max_new_tokens

    @torch.inference_mode()
    def __call__(self, captions: list[str]) -> list[str]:
        chats = [[{"role": "system", "content": SYSTEM_PROMPT},
                  {"role": "user", "content": SHORTEN_PROMPT.format(caption=c)}] for c in captions]
        inputs = self.tokenizer.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt",
                                                    padding=True, return_dict=True).to(self.device)
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id)  # (B, prompt + new)
        texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in texts]
