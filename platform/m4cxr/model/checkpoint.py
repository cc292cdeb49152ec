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
weights and there is no adapter/), for serving. `llm_parts` says where the base LLM and the
adapter of a checkpoint are, for an engine that loads the LLM itself (model/vllm_engine.py); such
an engine's server loads the rest with `load_checkpoint(..., llm="embeddings")`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Dinov2Model

from m4cxr.config import Experiment, experiment_from_dict, save_experiment
from m4cxr.model.m4cxr import M4CXR, build_model, resolve_attention
from m4cxr.model.tokenizer import load_tokenizer
from m4cxr.model.vision import VisionEncoder

# 2: the authors' architecture (SiLU in the C-Abstractor's squeeze-excitation, timm's names,
# vision features before the encoder's final layernorm) and their prompt format
FORMAT = "m4cxr-checkpoint-2"


def save_checkpoint(model: M4CXR, exp: Experiment, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    proj = model.projector
    base = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    # the base LLM is saved when it cannot be loaded again from its id: random weights from a
    # config, or a run that trained it fully
    from_config = bool(exp.model.llm_config) or any(
        "llm" in getattr(exp.train, stage).trainable for stage in ("pretrain", "instruction"))
    info = checkpoint_info(
        model.image_size, model.image_mean, model.image_std, model.box_convention,
        projector={"num_input_tokens": proj.pos_emb.shape[1], "encoder_dim": proj.pos_emb.shape[2],
                   "llm_dim": base.config.hidden_size, "hidden_size": exp.model.projector.hidden_size,
                   "depth": exp.model.projector.depth, "mlp_depth": exp.model.projector.mlp_depth,
                   "num_query_tokens": proj.num_query_tokens},
        llm="llm" if from_config else exp.model.llm, merged=not hasattr(model.llm, "get_base_model"))
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


def checkpoint_info(image_size: int, image_mean: list[float], image_std: list[float], box_convention: str,
                    projector: dict, llm: str, merged: bool) -> dict:
    """m4cxr.json: what rebuilds the model around its weight folders. `llm` is "llm" (the
    checkpoint's own llm/ folder) or the hub id / folder of the base LLM; `merged`: no adapter."""
    return {"format": FORMAT, "image_size": image_size, "image_mean": list(image_mean), "image_std": list(image_std),
            "box_convention": box_convention, "projector": projector, "llm": llm, "merged": merged}


def base_weights(base) -> dict[str, torch.Tensor]:
    """The base LLM's own weights from a model with LoRA layers injected (adapters left out)."""
    return {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}


def read_info(folder: str | Path) -> dict:
    folder = Path(folder)
    if not (folder / "m4cxr.json").is_file():
        raise FileNotFoundError(f"{folder}: not an M4CXR checkpoint (no m4cxr.json)")
    info = json.loads((folder / "m4cxr.json").read_text())
    if info.get("format") != FORMAT:
        # an earlier version's model: ReLU in the squeeze-excitation, vision features after the
        # final layernorm, other prompts. Its weights would load and answer wrongly.
        raise ValueError(
            f"{folder} is a checkpoint of format {info.get('format')!r}, written by an earlier version of this "
            f"platform whose projector, vision features and prompts differ from the authors' model ({FORMAT}). "
            "Its weights cannot be reused here: train it again (m4cxr train, or m4cxr quickstart), or start "
            "from the authors' release with m4cxr model import.")
    return info


def read_experiment(folder: str | Path) -> Experiment:
    """The experiment a checkpoint was trained with."""
    path = Path(folder) / "experiment.yaml"
    return experiment_from_dict(yaml.safe_load(path.read_text()), str(path))


def llm_parts(folder: str | Path) -> tuple[str, Path | None]:
    """(the base LLM: a folder of the checkpoint or a hub id/folder, the LoRA adapter folder or
    None when LoRA was merged)."""
    folder = Path(folder)
    info = read_info(folder)
    base = str(folder / "llm") if info["llm"] == "llm" or info["merged"] else info["llm"]
    return base, None if info["merged"] else folder / "adapter"


class InputEmbeddings(nn.Module):
    """Only the LLM's input embedding table: all the model needs when another engine runs the
    LLM on the prompt embeddings it writes."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(weight, freeze=True)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens


def load_input_embeddings(source: str, dtype=None) -> InputEmbeddings:
    """The input embedding table of an LLM folder or hub id, read from its safetensors without
    building the model (its name comes from the architecture, built on the meta device)."""
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    table = llm.get_input_embeddings()
    name = next(n for n, m in llm.named_modules() if m is table) + ".weight"
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download  # only for a hub id, which needs the network

        folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
    index = folder / "model.safetensors.index.json"
    file = folder / (json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors")
    with safe_open(str(file), "pt") as f:
        weight = f.get_tensor(name)
    return InputEmbeddings(weight.to(dtype) if dtype is not None else weight)


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu", dtype=None,
                    trainable: bool = False, llm: str = "full") -> tuple[M4CXR, Experiment]:
    """Rebuild the model of a checkpoint on `device` (CPU or GPU). With trainable, the LoRA
    adapter stays trainable (to continue training); otherwise the model is in eval mode.
    llm="embeddings" loads only the LLM's input embeddings (for an engine that runs the LLM)."""
    if llm not in ("full", "embeddings"):
        raise ValueError(f"llm must be 'full' or 'embeddings', got {llm!r}")
    folder = Path(folder)
    info = read_info(folder)
    exp = read_experiment(folder)
    tokenizer = load_tokenizer(str(folder / "tokenizer"))
    on_gpu = torch.device(device).type == "cuda"
    attention = resolve_attention(exp.model.attention, on_gpu)
    vision = VisionEncoder(Dinov2Model.from_pretrained(folder / "vision", dtype=dtype))
    llm_source, adapter = llm_parts(folder)
    if llm == "embeddings":
        language_model = load_input_embeddings(llm_source, dtype)
    else:
        language_model = AutoModelForCausalLM.from_pretrained(llm_source, attn_implementation=attention, dtype=dtype)
        if adapter is not None:
            language_model = PeftModel.from_pretrained(language_model, adapter, is_trainable=trainable)
    image = {k: info[k] for k in ("image_size", "image_mean", "image_std", "box_convention")}
    model = build_model(exp, tokenizer, vision=vision, llm=language_model, projector=info["projector"], image=image)
    model.projector.load_state_dict(load_file(folder / "projector.safetensors"))
    if dtype is not None:
        model.projector.to(dtype)
    model.to(device)
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
