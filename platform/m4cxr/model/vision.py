"""The vision encoder: Rad-DINO, a DINOv2 ViT-B/14, as a transformers Dinov2Model.

Real runs load it from a hub id (`microsoft/rad-dino`) or a local folder; tiny runs and the
full-size summary build the same class from a config with random weights. The projector gets
the last layer's patch tokens without the CLS token, taken *before* Dinov2Model's final
layernorm (`hidden_states[-1]`, as the authors' Honeybee code does): (518 / 14)^2 = 1369 tokens
at 518 px.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

class VisionEncoder(nn.Module):
    def __init__(self, model):  # a transformers Dinov2Model
        super().__init__()
        self.model = model
        self.hidden_size = model.config.hidden_size
        self.patch_size = model.config.patch_size

    def num_tokens(self, image_size: int) -> int:
        return (image_size // self.patch_size) ** 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> (images, patches, hidden): the last layer's output before the final
        layernorm, CLS dropped."""
        hidden = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
        return hidden[:, 1:]


def build_vision_encoder(source: str, config: dict | None, image_size: int) -> VisionEncoder:
    """From `config` (Dinov2Config fields; random weights) when given, else from a hub id or folder."""
    from transformers import Dinov2Config, Dinov2Model  # here, so the data path can import this module cheaply

    if config:
        cfg = Dinov2Config(**{"image_size": image_size, **config})
        return VisionEncoder(Dinov2Model(cfg))
    return VisionEncoder(Dinov2Model.from_pretrained(source))


def image_array(image: Image.Image, size: int, convention: str = "resize") -> np.ndarray:
    """One image -> (size, size) uint8 grayscale, in the frame boxes are written in."""
    image = image.convert("L")
    if convention == "center_crop":
        # as Rad-DINO's published processor (BitImageProcessor: shortest edge to `size`, the long
        # side truncated, bicubic, then a centred square): tests/test_vision_preprocessing.py
        short, long = sorted(image.size)
        w, h = (size, int(size * long / short)) if image.width <= image.height else (int(size * long / short), size)
        if (w, h) != image.size:
            image = image.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def normalise(gray: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(n, H, W) uint8 grayscale -> (n, 3, H, W) float, normalised with the encoder's mean/std.
    Done where the model runs, so the data path moves one byte per pixel instead of twelve."""
    x = gray.float().div(255.0).unsqueeze(1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def pixel_values(images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float],
                 convention: str = "resize") -> torch.Tensor:
    """Images -> (n, 3, size, size) normalised floats, in the frame boxes are written in."""
    if not images:
        return torch.zeros(0, 3, size, size)
    gray = np.stack([image_array(im, size, convention) for im in images])
    return normalise(torch.from_numpy(gray), mean, std)
