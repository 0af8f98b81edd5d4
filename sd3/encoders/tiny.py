"""Tiny random-initialised encoders and VAE of the real classes, for tests and the quick start (no network).

`make_tiny(out_dir)` writes the hub layouts the normal loading code expects:

    out_dir/metaclip/        CLIPModel (text projection 32) + tokenizer      like facebook/metaclip-l14-400m
    out_dir/gemma/           Gemma2ForCausalLM (hidden 64) + tokenizer       like google/gemma-2-2b
    out_dir/modernbert/      ModernBertForMaskedLM (hidden 32) + tokenizer   like answerdotai/ModernBERT-large
    out_dir/flux/vae/        AutoencoderKL, 16 latent channels, /8           like black-forest-labs/FLUX.1-schnell
    out_dir/llava-next/      LlavaNextForConditionalGeneration + processor   like llava-hf/llama3-llava-next-8b-hf
    out_dir/llama/           LlamaForCausalLM + chat tokenizer               like meta-llama/Meta-Llama-3-8B-Instruct

The loaders take `CLIPTextModelWithProjection`, `Gemma2Model` and `ModernBertModel` out of these checkpoints exactly
as they do from the hub repos. Tokenizers are WordPiece models built offline with the `tokenizers` library over a
fixed vocabulary (the words of the synthetic shapes captions, plus single characters so any word still tokenizes).
The VAE gets the weights shipped in sd3/assets/ (trained on shapes by `sd3 make-tiny --train-vae-steps`), so it
really reconstructs the shapes images; without them it is random.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    ModernBertConfig,
    ModernBertForMaskedLM,
    PreTrainedTokenizerFast,
)

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"
TINY_VAE_WEIGHTS = ASSET_DIR / "tiny_vae.safetensors"  # written by `sd3 make-tiny --train-vae-steps N --save-asset`

# Words of the shapes captions (colours, shapes, positions, sizes) and of ordinary prompts; anything else falls back
# to single characters.
WORDS = """
a an the of in on at to and with is are it its this that there one two three some near next by from into over under
image picture photo drawing illustration render shows showing shown depicts depicting features containing contains
see can we here simple plain flat solid filled outlined coloured colored colour color background foreground shape
shapes object objects figure sits placed located positioned centered centred
red green blue yellow orange purple violet pink brown black white gray grey cyan magenta teal navy maroon olive lime
gold silver beige turquoise indigo light dark bright pale
circle circles square squares triangle triangles rectangle rectangles star stars ellipse oval diamond hexagon
pentagon cross ring heart disc disk dot box
top bottom left right center centre middle upper lower corner side edge half quarter above below
small large big tiny medium huge little
""".split()
CHARACTERS = list(string.ascii_lowercase + string.digits + string.punctuation)
SMALL_VOCAB = list(
    dict.fromkeys(sorted(WORDS) + CHARACTERS + [f"##{c}" for c in string.ascii_lowercase + string.digits])
)

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    # 4 blocks, 3 downsamplings -> /8 like FLUX; narrow at full resolution for CPU speed
    block_out_channels=[8, 16, 32, 32],
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
    use_quant_conv=False,  # as FLUX.1's VAE
    use_post_quant_conv=False,
    mid_block_add_attention=False,  # fully convolutional: trained on crops, used on whole images of any bucket
    scaling_factor=1.0,  # replaced by the shipped/trained statistics (1/std and mean of the latents)
    shift_factor=0.0,
)



def _image_processor(name: str):
    """transformers' PIL-backed image processor class where it has one (transformers 5 warns on every load of the
    default class without torchvision, which the CPU build of torch does not bring), else the default."""
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)

def build_tokenizer(specials_first: list[str], specials_last: list[str], template: str, pair: str,
                    special_tokens: dict[str, str], max_length: int) -> PreTrainedTokenizerFast:
    """A lower-casing WordPiece tokenizer over SMALL_VOCAB; `template` adds the model's special tokens."""
    vocab = {tok: i for i, tok in enumerate(specials_first + SMALL_VOCAB + specials_last)}
    tok = Tokenizer(WordPiece(vocab, unk_token=special_tokens["unk_token"], max_input_chars_per_word=50))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    used = sorted({w for w in (template + " " + pair).split() if w in vocab})
    tok.post_processor = processors.TemplateProcessing(
        single=template, pair=pair, special_tokens=[(w, vocab[w]) for w in used]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_length, padding_side="right", **special_tokens
    )


def clip_tokenizer() -> PreTrainedTokenizerFast:
    # Real CLIP keeps <|startoftext|>/<|endoftext|> at the end of the vocabulary and pads with <|endoftext|>; the
    # pooled output is read at the first <|endoftext|>. A separate <unk> keeps unknown text from looking like the end.
    return build_tokenizer(
        ["<unk>"], ["<|startoftext|>", "<|endoftext|>"],
        "<|startoftext|> $A <|endoftext|>", "<|startoftext|> $A <|endoftext|> $B <|endoftext|>",
        dict(unk_token="<unk>", bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
        max_length=77,
    )


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    # Gemma's ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3; it prepends <bos> and adds no <eos>.
    return build_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>"], [], "<bos> $A", "<bos> $A $B",
        dict(unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"),
        max_length=8192,
    )


def bert_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(
        ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"], [], "[CLS] $A [SEP]", "[CLS] $A [SEP] $B [SEP]",
        dict(unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]"),
        max_length=8192,
    )


def write_clip(out: Path) -> None:
    tok = clip_tokenizer()
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=32, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        # Not 2: transformers' CLIPTextTransformer then pools at the first eos_token_id (else at argmax of the ids).
        eos_token_id=tok.eos_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # The image processor makes the folder a full CLIP (CLIPProcessor.from_pretrained), as `sd3 eval --clip` loads.
    _image_processor("CLIPImageProcessor")(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(out)


def write_gemma(out: Path) -> None:
    tok = gemma_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=512, sliding_window=64,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    Gemma2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)


def write_modernbert(out: Path) -> None:
    tok = bert_tokenizer()
    config = ModernBertConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=512, local_attention=64, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, cls_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        sep_token_id=tok.sep_token_id,
    )
    ModernBertForMaskedLM(config).save_pretrained(out)
    tok.save_pretrained(out)


def tiny_vae(weights: Path | None = TINY_VAE_WEIGHTS) -> AutoencoderKL:
    """The tiny VAE; with `weights` (a safetensors file with the state dict and the latent statistics) when it
    exists."""
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    if weights is not None and Path(weights).is_file():
        from sd3.encoders.tiny_vae import load_vae_weights

        load_vae_weights(vae, Path(weights))
    return vae


def make_tiny(out_dir: str | Path, seed: int = 0, vae_weights: Path | None = TINY_VAE_WEIGHTS) -> Path:
    """Write the four tiny models under `out_dir` (see the module docstring); deterministic for a given seed."""
    out = Path(out_dir)
    torch.manual_seed(seed)
    write_clip(out / "metaclip")
    torch.manual_seed(seed + 1)
    write_gemma(out / "gemma")
    torch.manual_seed(seed + 2)
    write_modernbert(out / "modernbert")
    torch.manual_seed(seed + 3)
    tiny_vae(vae_weights).save_pretrained(out / "flux" / "vae")
    make_tiny_recaption(out, seed)  # llava-next/ and llama/, for `sd3 recaption`
    (out / "make_tiny.json").write_text(json.dumps({
        "written_by": "sd3 make-tiny", "seed": seed,
        "vae_weights": str(vae_weights) if vae_weights is not None and Path(vae_weights).is_file() else "random",
    }, indent=2))
    return out


def tiny_overrides(root: str | Path) -> list[str]:
    """`--encoders.*` config overrides that point a preset at the tiny models `make_tiny` wrote under `root`."""
    root = Path(root)
    return [f"--encoders.clip={root / 'metaclip'}", f"--encoders.gemma={root / 'gemma'}",
            f"--encoders.bert={root / 'modernbert'}", f"--encoders.vae={root / 'flux'}", "--encoders.vae_subfolder=vae"]


# -- recaptioning (sd3 recaption): a tiny LLaVA-NeXT captioner and a tiny Llama shortener, the real classes --------

IMAGE_TOKEN = "<image>"
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<pad>", "<unk>", IMAGE_TOKEN]
# Llama-3's chat format; an {"type": "image"} content part becomes the <image> placeholder the processor expands.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """A WordPiece stand-in with Llama-3's special tokens and chat template, padded on the left for generation."""
    tok = build_tokenizer(
        LLAMA3_SPECIALS, [], "<|begin_of_text|> $A", "<|begin_of_text|> $A $B",
        dict(unk_token="<unk>", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>"),
        max_length=4096,
    )
    # The chat template writes the bos token itself: the post-processor must not add a second one.
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    tok.add_special_tokens({"additional_special_tokens": [t for t in LLAMA3_SPECIALS if t not in
                                                          ("<|begin_of_text|>", "<|eot_id|>", "<pad>", "<unk>")]})
    tok.padding_side = "left"
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


def _tiny_llama_config(tok: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )


def write_llama(out: Path) -> None:
    """LlamaForCausalLM + tokenizer, like meta-llama/Meta-Llama-3-8B-Instruct (the recaption shortener)."""
    tok = llama3_tokenizer()
    LlamaForCausalLM(_tiny_llama_config(tok)).save_pretrained(out)
    tok.save_pretrained(out)


def write_llava_next(out: Path) -> None:
    """LlavaNextForConditionalGeneration + LlavaNextProcessor, like llava-hf/llama3-llava-next-8b-hf (the captioner):
    a CLIP vision tower (32 px, patch 8), the anyres grid of LLaVA-NeXT on 32/64 px tiles, a Llama language model."""
    tok = llama3_tokenizer()
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    config = LlavaNextConfig(vision_config=vision, text_config=_tiny_llama_config(tok),
                             image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), image_grid_pinpoints=pinpoints,
                             vision_feature_layer=-1, vision_feature_select_strategy="default")
    LlavaNextForConditionalGeneration(config).save_pretrained(out)
    image_processor = _image_processor("LlavaNextImageProcessor")(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default", chat_template=LLAMA3_CHAT_TEMPLATE,
                                   image_token=IMAGE_TOKEN, num_additional_image_tokens=1)  # CLIP's CLS
    processor.save_pretrained(out)


def make_tiny_recaption(out_dir: str | Path, seed: int = 0) -> Path:
    """out_dir/llava-next/ and out_dir/llama/: the two tiny recaption models (random weights: gibberish output)."""
    out = Path(out_dir)
    torch.manual_seed(seed + 4)
    write_llava_next(out / "llava-next")
    torch.manual_seed(seed + 5)
    write_llama(out / "llama")
    return out
