"""The authors' published M4CXR in, a checkpoint of ours out (`m4cxr model import`).

Their training code (deepnoid-ai/M4CXR-TNNLS) writes two folders:

- stage 1, a Hugging Face model folder of their whole model: `config.json` (vision, projector and
  LLM settings), `model*.safetensors` (or `pytorch_model*.bin`) with `vision_model.*` (Rad-DINO's
  Dinov2Model under transformers-4 names), `abstractor.*` (the C-Abstractor under timm's names,
  which are ours) and `language_model.*` (Mistral), and the tokenizer;
- stage 2, a PEFT adapter: LoRA on the language model's q_proj / v_proj
  (`base_model.model.language_model.model.layers.N.self_attn.q_proj.lora_A.weight`) with the
  vision encoder and the projector saved whole (`modules_to_save`), which replace stage 1's.

A single folder with the LoRA merged into `language_model.*` imports without an adapter. Every
tensor is mapped by name and checked against the model's layout, built on the meta device from
the Rad-DINO and Mistral configurations: a name that maps nowhere, a tensor missing or a shape
that differs stops the import with the names; nothing is loaded partially.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, Dinov2Config, Dinov2Model, PretrainedConfig

from m4cxr.config import experiment_from_dict, save_experiment
from m4cxr.model.checkpoint import checkpoint_info
from m4cxr.model.projector import CAbstractor
from m4cxr.model.summary import KNOWN, published_architectures
from m4cxr.model.tokenizer import load_tokenizer

# transformers 5 renamed Dinov2's attention projections; the release keeps the old names
DINOV2_V4_NAMES = (("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
                   ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj."))
PREFIXES = {"vision_model.": "vision", "abstractor.": "projector", "language_model.": "llm"}
RAD_DINO_IMAGE = {"image_size": 518, "image_mean": [0.5307] * 3, "image_std": [0.2583] * 3}  # its processor
SHARD_BYTES = 4 << 30


def map_key(key: str) -> tuple[str, str] | None:
    """One tensor name of the release -> (part, our name): part is vision, projector, llm or lora;
    None for a name outside their layout."""
    name = key.removeprefix("base_model.model.")
    for prefix, part in PREFIXES.items():
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if part == "vision":
                for old, new in DINOV2_V4_NAMES:
                    rest = rest.replace(old, new)
            if part == "llm" and ".lora_" in rest:
                return "lora", "base_model.model." + rest
            return part, rest
    return None


# ----------------------------------------------------------------------------- reading the folders


class Tensors:
    """The weight tensors of a folder (safetensors, else PyTorch .bin files), by name, read one at
    a time. `stem` names the weight files (model, adapter_model): a Trainer checkpoint folder also
    holds optimizer.pt, training_args.bin and the like."""

    def __init__(self, folder: Path, stem: str):
        self.where: dict[str, Any] = {}
        files = sorted(folder.glob(f"{stem}*.safetensors"))
        for file in files:
            with safe_open(str(file), "pt") as f:
                self.where.update({k: file for k in f.keys()})
        if not files:
            for file in sorted(folder.glob(f"{'pytorch_model' if stem == 'model' else stem}*.bin")):
                self.where.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
        if not self.where:
            raise FileNotFoundError(f"{folder}: no weight files ({stem}*.safetensors or .bin)")

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self.where[name]
        if isinstance(value, torch.Tensor):
            return value
        with safe_open(str(value), "pt") as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        value = self.where[name]
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        with safe_open(str(value), "pt") as f:
            return tuple(f.get_slice(name).get_shape())


def architecture(source: str, what: str, option: str) -> PretrainedConfig:
    """A pretrained part's configuration: a local folder, the published numbers of Rad-DINO and
    Mistral-7B-Instruct-v0.2 (shipped with the package), or the hub cache."""
    if Path(source).is_dir():
        return AutoConfig.from_pretrained(source)
    if source in KNOWN:
        fields = dict(published_architectures()[KNOWN[source]])
        return Dinov2Config(**fields) if what == "vision" else AutoConfig.for_model("mistral", **fields)
    try:
        return AutoConfig.from_pretrained(source)
    except OSError as err:
        raise ValueError(f"the {what} configuration {source!r} is neither a folder nor at hand ({err}); "
                         f"give its folder with {option}") from err


def image_settings(processor: str | None, base: Path, vision_source: str) -> dict:
    """Image side, mean and std, and the box frame, from an image processor's
    preprocessor_config.json (the release's own, the option's or the vision encoder's folder)."""
    candidates = [Path(processor)] if processor else [base, Path(vision_source)]
    for folder in candidates:
        file = folder / "preprocessor_config.json"
        if file.is_file():
            cfg = json.loads(file.read_text())
            crop = cfg.get("crop_size", {})
            side = crop.get("height", crop) if isinstance(crop, dict) else crop
            short = cfg.get("size", {}).get("shortest_edge", side)
            if cfg.get("do_center_crop", True) and short != side:
                raise ValueError(f"{file}: shortest edge {short} and crop {side} differ; the model sees a "
                                 f"{side} px square here only when they are equal")
            return {"image_size": int(side), "image_mean": list(cfg["image_mean"]), "image_std": list(cfg["image_std"]),
                    "box_convention": "center_crop" if cfg.get("do_center_crop", True) else "resize"}
    if processor:
        raise FileNotFoundError(f"{processor}: no preprocessor_config.json")
    if vision_source == "microsoft/rad-dino":
        return {**RAD_DINO_IMAGE, "box_convention": "center_crop"}
    raise ValueError(f"no image processor found for the vision encoder {vision_source!r}; give its folder with --processor")


def projector_settings(release_config: dict, shapes: dict[str, tuple[int, ...]]) -> dict:
    """The C-Abstractor's settings from the release's projector_config and its tensors' shapes.
    Honeybee's other projectors and options this model does not use are refused by name."""
    p = release_config.get("projector_config", {})
    refused = {"projector_type": ("c-abs", p.get("projector_type", "c-abs")),
               "num_eos_tokens": (0, p.get("num_eos_tokens", 0)), "prenorm": (False, p.get("prenorm", False)),
               "pos_emb": (True, p.get("pos_emb", True)), "feature_layer_index": (-1, p.get("feature_layer_index", -1))}
    for key, (supported, value) in refused.items():
        if value != supported:
            raise ValueError(f"projector_config.{key} is {value!r}; the import knows M4CXR's C-Abstractor "
                             f"({key} {supported!r}) only")
    if "pos_emb" not in shapes:
        raise ValueError("the release has no abstractor.pos_emb: not M4CXR's C-Abstractor")
    blocks = {int(m.group(1)) for n in shapes if (m := re.match(r"net\.0\.b(\d+)\.", n))}
    readout = sorted(int(m.group(1)) for n in shapes if (m := re.match(r"readout\.(\d+)\.weight", n)))
    _, tokens, encoder_dim = shapes["pos_emb"]
    settings = {"num_input_tokens": tokens, "encoder_dim": encoder_dim, "llm_dim": shapes[f"readout.{readout[-1]}.weight"][0],
                "hidden_size": shapes["net.0.b1.conv1.conv.weight"][0], "depth": len(blocks),
                "mlp_depth": len(readout), "num_query_tokens": int(p.get("num_query_tokens", 361))}
    for key in ("depth", "mlp_depth", "hidden_size"):
        if key in p and p[key] != settings[key]:
            raise ValueError(f"projector_config.{key} {p[key]} disagrees with the tensors ({settings[key]})")
    return settings


# ----------------------------------------------------------------------------- the layout check


def expected_layout(vision: PretrainedConfig, llm: PretrainedConfig, projector: dict,
                    lora: dict | None) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every tensor of our model's parts, name -> shape, built on the meta device (no memory)."""
    with torch.device("meta"):
        parts = {"vision": Dinov2Model(vision), "projector": CAbstractor(**projector),
                 "llm": AutoModelForCausalLM.from_config(llm)}
        layout = {part: {n: tuple(t.shape) for n, t in m.state_dict().items()} for part, m in parts.items()}
        if lora:
            peft = get_peft_model(parts["llm"], LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                                           target_modules=lora["target_modules"]))
            layout["lora"] = {n.replace(".default.", "."): tuple(t.shape) for n, t in peft.state_dict().items()
                              if ".lora_" in n}
    return layout


def check_layout(mapped: dict[str, dict[str, tuple[int, ...]]], expected: dict[str, dict[str, tuple[int, ...]]],
                 unknown: list[str]) -> None:
    """Every expected tensor present with its shape, nothing left over; else one error naming them."""
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) outside the release layout: {unknown[:10]}")
    for part, want in expected.items():
        have = mapped.get(part, {})
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        shapes = [f"{n} {have[n]} (the model has {want[n]})" for n in sorted(set(want) & set(have)) if have[n] != want[n]]
        for what, names in (("missing", missing), ("not in the model", extra), ("of another shape", shapes)):
            if names:
                problems.append(f"{part}: {len(names)} tensor(s) {what}: {names[:10]}")
    if problems:
        raise ValueError("the release does not fit M4CXR's layout:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- the import


def read_release(base: Path, adapter: Path | None) -> tuple[dict[str, dict[str, tuple[Tensors, str]]], list[str]]:
    """part -> our name -> (where the tensor is, its name there); the adapter's tensors replace the
    base's (its modules_to_save). Also the names that map nowhere."""
    mapped: dict[str, dict[str, tuple[Tensors, str]]] = {}
    unknown = []
    sources = [Tensors(base, "model")] + ([Tensors(adapter, "adapter_model")] if adapter else [])
    for tensors in sources:
        for key in tensors.where:
            target = map_key(key)
            if target is None:
                unknown.append(key)
            else:
                mapped.setdefault(target[0], {})[target[1]] = (tensors, key)
    if "lora" in mapped and adapter is None:
        unknown += [key for _, key in mapped.pop("lora").values()]
    return mapped, unknown


def lora_settings(adapter: Path, lora_names: list[str]) -> dict:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter}/adapter_config.json: peft_type {cfg['peft_type']!r}; only LoRA adapters import")
    extra = [m for m in cfg.get("modules_to_save") or [] if m not in ("vision_model", "abstractor")]
    if extra:
        raise ValueError(f"{adapter}/adapter_config.json: modules_to_save {extra} are not parts of M4CXR")
    targets = sorted({m.group(1) for n in lora_names if (m := re.search(r"\.(\w+)\.lora_[AB]\.", n))})
    return {"r": int(cfg["r"]), "alpha": int(cfg["lora_alpha"]), "dropout": float(cfg.get("lora_dropout", 0.0)),
            "target_modules": targets}


def write_llm(tensors: dict[str, tuple[Tensors, str]], config: PretrainedConfig, folder: Path) -> None:
    """The LLM's tensors as a Hugging Face folder, shard by shard (a 7B model never in memory)."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    weight_map, shard, size, index = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        if shard:
            index += 1
            name = f"model-{index:05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for ours, (source, key) in sorted(tensors.items()):
        t = source[key].contiguous()
        if size and size + t.nbytes > SHARD_BYTES:
            flush()
        shard[ours] = t
        size += t.nbytes
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def import_release(base: str | Path, out: str | Path, adapter: str | Path | None = None, vision: str | None = None,
                   llm: str | None = None, processor: str | None = None, tokenizer: str | None = None) -> dict:
    """The authors' stage-1 folder (and stage-2 adapter) -> a checkpoint of ours in `out`.
    vision / llm: the Rad-DINO and Mistral configurations (folder or hub id) where the release
    names ones not at hand; processor: the image processor's folder; tokenizer: where the release
    has none. Returns what was imported."""
    base, out = Path(base), Path(out)
    adapter = Path(adapter) if adapter else None
    release_config = json.loads((base / "config.json").read_text()) if (base / "config.json").is_file() else {}
    vision_source = vision or release_config.get("vision_config", {}).get("pretrained_vision_name_or_path",
                                                                           "microsoft/rad-dino")
    llm_source = llm or release_config.get("lm_config", {}).get("pretrained_lm_name_or_path",
                                                                "mistralai/Mistral-7B-Instruct-v0.2")
    mapped, unknown = read_release(base, adapter)
    shapes = {part: {n: src.shape(key) for n, (src, key) in names.items()} for part, names in mapped.items()}
    vision_config = architecture(vision_source, "vision", "--vision-config")
    llm_config = architecture(llm_source, "llm", "--llm-config")
    projector = projector_settings(release_config, shapes.get("projector", {}))
    lora = lora_settings(adapter, list(shapes.get("lora", {}))) if adapter else None
    check_layout(shapes, expected_layout(vision_config, llm_config, projector, lora), unknown)

    images = image_settings(processor, base, vision_source)
    tok_source = tokenizer or (str(base) if any((base / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json",
                                                                                  "tokenizer.model"))
                               else release_config.get("lm_config", {}).get("pretrained_tokenizer_name_or_path", llm_source))
    tok = load_tokenizer(tok_source)
    out.mkdir(parents=True, exist_ok=True)
    encoder = Dinov2Model(vision_config)
    encoder.load_state_dict({n: src[key] for n, (src, key) in mapped["vision"].items()}, strict=True)
    encoder.save_pretrained(out / "vision")
    save_file({n: src[key].contiguous() for n, (src, key) in mapped["projector"].items()}, out / "projector.safetensors")
    write_llm(mapped["llm"], llm_config, out / "llm")
    if lora:
        LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                   target_modules=lora["target_modules"], task_type="CAUSAL_LM").save_pretrained(out / "adapter")
        save_file({n: src[key].contiguous() for n, (src, key) in mapped["lora"].items()},
                  out / "adapter" / "adapter_model.safetensors")
    tok.save_pretrained(out / "tokenizer")
    info = checkpoint_info(images["image_size"], images["image_mean"], images["image_std"], images["box_convention"],
                           projector=projector, llm="llm", merged=lora is None)
    (out / "m4cxr.json").write_text(json.dumps(info, indent=2))
    p = {k: projector[k] for k in ("depth", "mlp_depth", "hidden_size", "num_query_tokens")}
    exp = experiment_from_dict({
        "name": "m4cxr-release", "description": f"imported from {base}" + (f" and {adapter}" if adapter else ""),
        "data": {"image_size": images["image_size"], "box_convention": images["box_convention"]},
        "model": {"vision_encoder": vision_source, "llm": llm_source, "image_mean": images["image_mean"],
                  "image_std": images["image_std"], "projector": {"kind": "c_abstractor", **p},
                  **({"lora": {k: lora[k] for k in ("r", "alpha", "dropout", "target_modules")}} if lora else {})},
    }, f"{out}/experiment.yaml")
    save_experiment(exp, out / "experiment.yaml")
    counts = {part: len(names) for part, names in mapped.items()}
    return {"checkpoint": str(out), "tensors": counts, "lora": lora, "image": images, "projector": projector,
            "tokenizer": tok_source, "vision_config": vision_source, "llm_config": llm_source}
