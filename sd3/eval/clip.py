"""CLIP image and text embeddings for the CLIP score and for FID on CLIP features, from a local or cached CLIP.

CLIP score (Hessel et al. 2021, "CLIPScore", eq. 1, with w = 100 as torchmetrics and most T2I papers report it):
100 · max(cos(E_image, E_text), 0), averaged over image-caption pairs. torchmetrics' CLIPScore implements the same
formula but breaks with transformers 5 (get_image_features now returns a model output, not a tensor) and accepts
only a few hub ids, so the embeddings are taken here with transformers directly and the formula applied by hand.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import CLIPModel, CLIPProcessor

from sd3.sample.images import to_pil


class Clip:
    """A CLIPModel + CLIPProcessor on `device`, loaded from a folder or a hub id already in the local cache."""

    def __init__(self, name_or_path: str | Path, device: torch.device):
        self.name = str(name_or_path)
        self.device = device
        self.model = CLIPModel.from_pretrained(self.name).to(device).eval().requires_grad_(False)
        self.processor = CLIPProcessor.from_pretrained(self.name)

    @torch.inference_mode()
    def image_embeds(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images (any sizes) -> (N, P) unit-norm projected image embeddings, float32."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)  # (N, 3, S, S)
        out = self.model.get_image_features(pixel_values=pixels)
        embeds = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5: a model output
        return nn.functional.normalize(embeds.float(), dim=-1)

    @torch.inference_mode()
    def text_embeds(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (N, P) unit-norm projected text embeddings, truncated at CLIP's context length."""
        tokens = self.processor(text=captions, return_tensors="pt", padding=True, truncation=True).to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        embeds = out if isinstance(out, torch.Tensor) else out.pooler_output
        return nn.functional.normalize(embeds.float(), dim=-1)

    def scores(self, images: list[Image.Image], captions: list[str]) -> torch.Tensor:
        """(N,) CLIP scores 100 · max(cos, 0) of image i with caption i."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        cos = (self.image_embeds(images) * self.text_embeds(captions)).sum(-1)  # (N,)
        return 100.0 * cos.clamp(min=0)


class ClipImageFeatures(nn.Module):
    """uint8 images (N, 3, H, W) -> (N, P) CLIP image embeddings: a feature extractor torchmetrics' FID accepts,
    for FID on CLIP features (Kynkäänniemi et al. 2023, "The Role of ImageNet Classes in Fréchet Inception
    Distance"), which needs no Inception weights."""

    def __init__(self, clip: Clip):
        super().__init__()
        self.clip = clip
        self.num_features = int(clip.model.config.projection_dim)  # read by torchmetrics instead of a dummy forward

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.image_embeds(to_pil(images.float() / 127.5 - 1.0))  # to_pil takes [-1, 1]
