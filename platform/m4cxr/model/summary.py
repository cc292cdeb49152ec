"""Parameter counts of an experiment's model, built on the meta device (no weights, no download).

For the paper's model ids the architecture numbers come from the package
(resources/hparams_table6.yaml: the published configs of Rad-DINO and Mistral-7B-Instruct-v0.2);
a local folder's config.json or the experiment's vision_config / llm_config serve otherwise.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, Dinov2Config, Dinov2Model

from m4cxr.config import Experiment
from m4cxr.model.m4cxr import add_lora, build_model, llm_architecture
from m4cxr.model.vision import VisionEncoder

KNOWN = {"microsoft/rad-dino": "rad_dino", "mistralai/Mistral-7B-Instruct-v0.2": "mistral_7b_instruct_v0_2"}


@lru_cache(maxsize=1)
def published_architectures() -> dict:
    text = resources.files("m4cxr").joinpath("resources/hparams_table6.yaml").read_text()
    return yaml.safe_load(text)["architectures"]


def vision_config(exp: Experiment) -> Dinov2Config:
    cfg = exp.model
    if cfg.vision_config:
        return Dinov2Config(**{"image_size": exp.data.image_size, **cfg.vision_config})
    if cfg.vision_encoder in KNOWN:
        fields = dict(published_architectures()[KNOWN[cfg.vision_encoder]])
        return Dinov2Config(**fields)
    if Path(cfg.vision_encoder).is_dir():
        return Dinov2Config.from_pretrained(cfg.vision_encoder)
    raise ValueError(f"no architecture known for vision encoder {cfg.vision_encoder!r} without downloading; "
                     "give a local folder or model.vision_config")


def llm_config(exp: Experiment):
    cfg = exp.model
    if not cfg.llm_config and cfg.llm in KNOWN:
        return AutoConfig.for_model("mistral", **published_architectures()[KNOWN[cfg.llm]])
    if not cfg.llm_config and not Path(cfg.llm).is_dir():
        raise ValueError(f"no architecture known for LLM {cfg.llm!r} without downloading; "
                         "give a local folder or model.llm_config")
    return llm_architecture(cfg)


def model_summary(exp: Experiment) -> dict:
    vcfg, lcfg = vision_config(exp), llm_config(exp)
    image_size = exp.data.image_size
    with torch.device("meta"):  # the model's own builder, on parts built from configs without weights
        vision = VisionEncoder(Dinov2Model(vcfg))
        llm = add_lora(AutoModelForCausalLM.from_config(lcfg), exp.model)
        model = build_model(exp, tokenizer=None, vision=vision, llm=llm)
    parts = {name: sum(t.numel() for t in params) for name, params in model.parts().items()}
    params = {"vision": parts["vision_encoder"], "projector": parts["projector"], "llm": parts["llm"]}
    lora = parts["llm_lora"]
    encoder_tokens = vision.num_tokens(image_size)
    p = exp.model.projector
    trainable = {stage: sum(parts[t] for t in getattr(exp.train, stage).trainable)
                 for stage in ("pretrain", "instruction")}
    return {
        "vision_encoder": exp.model.vision_encoder if not exp.model.vision_config else "config",
        "llm": exp.model.llm if not exp.model.llm_config else "config",
        "params": params,
        "lora_params": lora,
        "total_params": params["vision"] + params["projector"] + params["llm"] + lora,
        "trainable": trainable,
        "encoder_tokens_per_image": encoder_tokens,
        "visual_tokens_per_image": p.num_query_tokens,
        "image_size": image_size,
    }
