"""Conversations and images -> the model's input tensors: each conversation tokenised in the
authors' chat format (model/tokenizer.py), each `<image>` expanded to the projector's number of
visual tokens, rows padded (left for generation, so that a batch's prompts end together; right
for training), the images preprocessed into one pixel tensor in order; and the chain-of-thought
report exchange run on a model (generate_reports)."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from m4cxr.model.tokenizer import IGNORE, encode_conversation
from m4cxr.model.vision import pixel_values
from m4cxr.tasks import DEFAULT_SYSTEM_PROMPT, after_findings, report_questions, report_scenarios, takes_prior_study


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


def generate_reports(model, requests: Sequence[dict], cot: bool = True, max_new_tokens: int = 500,
                     system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Report generation for a batch of requests, each {"scenario": single_image | multi_image |
    multi_study, "images": [PIL...], "prior_images": [...], "prior_report": "..."}, on an M4CXR.
    With cot: ask for the findings, keep the model's answer, then ask for the report."""
    questions, images = [], []
    for r in requests:
        scenario = r.get("scenario", report_scenarios()[0])
        if scenario not in report_scenarios():
            raise ValueError(f"unknown scenario {scenario!r}; use one of {report_scenarios()}")
        prior = list(r.get("prior_images", [])) if takes_prior_study(scenario) else []
        questions.append(report_questions(scenario, len(r["images"]), len(prior), r.get("prior_report", ""),
                                          system_prompt, cot))
        images.append(prior + list(r["images"]))
    first = model.generate([q for q, _ in questions], images, max_new_tokens)
    if not cot:
        return [{"findings": "", "report": report} for report in first]
    second = [after_findings(q, findings, follow) for (q, follow), findings in zip(questions, first)]
    reports = model.generate(second, images, max_new_tokens)
    return [{"findings": f, "report": report} for f, report in zip(first, reports)]
