"""Conversations and images -> the model's input tensors: each conversation tokenised in the
authors' chat format (model/tokenizer.py), each `<image>` expanded to the projector's number of
visual tokens, rows padded (left for generation, so that a batch's prompts end together; right
for training), the images preprocessed into one pixel tensor in order."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from m4cxr.model.tokenizer import IGNORE, encode_conversation
from m4cxr.model.vision import pixel_values


def pad_batch(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> dict:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    label_t = torch.full((len(ids), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        sl = slice(width - len(x), width) if left else slice(0, len(x))
        input_ids[i, sl] = torch.tensor(x)
        label_t[i, sl] = torch.tensor(y)
        mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}


def collate(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Sequence[dict]],
            images: Sequence[Sequence[Image.Image]], tokens_per_image: int, image_size: int,
            image_mean: Sequence[float], image_std: Sequence[float], box_convention: str,
            for_generation: bool = False) -> dict[str, torch.Tensor | None]:
    """{"input_ids", "attention_mask", "labels", "pixel_values"} of a batch of conversations."""
    encoded = [encode_conversation(tokenizer, c, tokens_per_image, for_generation) for c in conversations]
    batch = pad_batch([e[0] for e in encoded], [e[1] for e in encoded], tokenizer.pad_token_id, left=for_generation)
    flat = [im for sample in images for im in sample]
    batch["pixel_values"] = pixel_values(flat, image_size, image_mean, image_std, box_convention) if flat else None
    return batch
