"""Checkpoints in Hugging Face style, with safetensors.

    m4cxr.json            what is needed to rebuild the model (architectures, image settings)
    experiment.yaml       the experiment config the model was trained with
    vision/               the vision encoder (Dinov2Model.save_pretrained; it trains in stage 2)
    projector.safetensors the C-Abstractor
    adapter/              the LoRA adapter (peft)
    llm/                  the base LLM, only when it was built from a config (random weights);
                          otherwise m4cxr.json names its hub id or folder
    tokenizer/            the tokenizer, with its chat template and <image> token

`export_merged` writes a copy with LoRA merged into the LLM (llm/ then holds the merged
weights and there is no adapter/), for serving.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Dinov2Model

from m4cxr.config import Experiment, experiment_from_dict, save_experiment
from m4cxr.model.m4cxr import M4CXR, resolve_attention
from m4cxr.model.projector import CAbstractor
from m4cxr.model.tokenizer import load_tokenizer
from m4cxr.model.vision import VisionEncoder


def save_checkpoint(model: M4CXR, exp: Experiment, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    proj = model.projector
    base = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    # the base LLM is saved when it cannot be loaded again from its id: random weights from a
    # config, or a run that trained it fully
    from_config = bool(exp.model.llm_config) or any(
        "llm" in getattr(exp.train, stage).trainable for stage in ("pretrain", "instruction"))
    info = {
        "format": "m4cxr-checkpoint-1",
        "image_size": model.image_size, "image_mean": model.image_mean, "image_std": model.image_std,
        "box_convention": model.box_convention,
        "projector": {"num_input_tokens": proj.pos_emb.shape[1], "encoder_dim": proj.pos_emb.shape[2],
                      "llm_dim": base.config.hidden_size, "hidden_size": exp.model.projector.hidden_size,
                      "depth": exp.model.projector.depth, "mlp_depth": exp.model.projector.mlp_depth,
                      "num_query_tokens": proj.num_query_tokens},
        "llm": "llm" if from_config else exp.model.llm,
        "merged": not hasattr(model.llm, "get_base_model"),
    }
    (folder / "m4cxr.json").write_text(json.dumps(info, indent=2))
    save_experiment(exp, folder / "experiment.yaml")
    model.vision.model.save_pretrained(folder / "vision")
    save_file({k: v.detach().contiguous().cpu() for k, v in proj.state_dict().items()}, folder / "projector.safetensors")
    if info["merged"]:
        model.llm.save_pretrained(folder / "llm")
    else:
        model.llm.save_pretrained(folder / "adapter")
        if from_config:
            base.save_pretrained(folder / "llm", state_dict=base_weights(base))
    model.tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def base_weights(base) -> dict[str, torch.Tensor]:
    """The base LLM's own weights from a model with LoRA layers injected (adapters left out)."""
    return {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu", dtype=None,
                    trainable: bool = False) -> tuple[M4CXR, Experiment]:
    """Rebuild the model of a checkpoint on `device` (CPU or GPU). With trainable, the LoRA
    adapter stays trainable (to continue training); otherwise the model is in eval mode."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "m4cxr.json").is_file():
        raise FileNotFoundError(f"{folder}: not an M4CXR checkpoint (no m4cxr.json)")
    info = json.loads((folder / "m4cxr.json").read_text())
    import yaml

    exp = experiment_from_dict(yaml.safe_load((folder / "experiment.yaml").read_text()), str(folder / "experiment.yaml"))
    tokenizer = load_tokenizer(str(folder / "tokenizer"))
    on_gpu = torch.device(device).type == "cuda"
    attention = resolve_attention(exp.model.attention, on_gpu)
    vision = VisionEncoder(Dinov2Model.from_pretrained(folder / "vision", dtype=dtype))
    llm_source = folder / "llm" if info["llm"] == "llm" or info["merged"] else info["llm"]
    llm = AutoModelForCausalLM.from_pretrained(llm_source, attn_implementation=attention, dtype=dtype)
    if not info["merged"]:
        llm = PeftModel.from_pretrained(llm, folder / "adapter", is_trainable=trainable)
    projector = CAbstractor(**info["projector"])
    projector.load_state_dict(load_file(folder / "projector.safetensors"))
    if dtype is not None:
        projector.to(dtype)
    model = M4CXR(vision, projector, llm, tokenizer, info["image_size"], info["image_mean"], info["image_std"],
                  info["box_convention"]).to(device)
    if not trainable:
        model.eval()
    return model, exp


def export_merged(folder: str | Path, out: str | Path) -> Path:
    """A copy of the checkpoint with LoRA merged into the LLM weights (for serving)."""
    model, exp = load_checkpoint(folder)
    if hasattr(model.llm, "merge_and_unload"):
        model.llm = model.llm.merge_and_unload()
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    return save_checkpoint(model, exp, out)
