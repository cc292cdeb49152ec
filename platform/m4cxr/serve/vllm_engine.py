"""The LLM on vLLM: one engine per base LLM, the checkpoints over it as LoRA adapters.

The vision encoder and C-Abstractor run in the model server (serve/model_server.py), which
writes each prompt as LLM input embeddings, images spliced in (M4CXR.embed_prompts); vLLM's async
engine generates from those prompt embeddings with continuous batching, so requests of every
route and checkpoint share its batches. serve_apps/README.md says why this way rather than a vLLM
model class of M4CXR.

Checkpoints that share a base LLM and tokenizer (the default model and a sweep's winners, whose
LLM stayed frozen under LoRA) share one engine, each answering through its own adapter (vLLM's
LoRA support); a checkpoint whose LLM was trained or merged has another base, hence its own
engine. Bases are compared by their weights' hash, not their folder, because every checkpoint of a
tiny model saves its own copy of the same random base.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from m4cxr.model.checkpoint import llm_parts
from m4cxr.serve.inputs import RequestError
from m4cxr.serve.openai_chat import Sampling

# vLLM is optional (the engine's only; transformers serves without it): imported where it is used.


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


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


def sampling_params(sampling: Sampling, stream: bool):
    """vLLM's settings for a request; greedy asks for one answer (vLLM refuses n > 1 there), which
    `generate` repeats n times."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1 if sampling.greedy else sampling.n, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
        top_p=sampling.top_p if not sampling.greedy else 1.0, seed=sampling.seed, stop=list(sampling.stop) or None,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)


def finish(output, prompt_tokens: int) -> dict[str, Any]:
    """A vLLM completion as the details the routes report (model/m4cxr.py generate_details)."""
    return {"text": output.text.strip(), "prompt_tokens": prompt_tokens, "completion_tokens": len(output.token_ids),
            "finish_reason": "length" if output.finish_reason == "length" else "stop"}


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

    async def generate(self, checkpoint: str, embeds, sampling: Sampling, stream: bool = False) -> AsyncIterator:
        """Stream: the text pieces as they come, then the details (a dict). Otherwise: one list
        with the details of the n answers. The text is stripped as the HF engine strips it:
        leading and trailing white space never reach the client."""
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            async for item in self.answers(checkpoint, embeds, sampling, stream):
                yield item
        except VLLMValidationError as err:  # vLLM's own refusal of the request is the client's 400
            raise RequestError(f"the engine refused the request: {err}") from err
        except EngineDeadError as err:  # its process died: Serve's health check replaces the replica
            raise RequestError("the model's engine stopped; its replica is being replaced, retry shortly", 503) from err

    async def answers(self, checkpoint: str, embeds, sampling: Sampling, stream: bool) -> AsyncIterator:
        """generate(), without the translation of vLLM's errors."""
        params = sampling_params(sampling, stream)
        last, tokens, sent, held = None, 0, False, ""
        async for out in self.engine.generate({"prompt_embeds": embeds}, params, request_id=uuid.uuid4().hex,
                                              lora_request=self.lora_requests.get(checkpoint)):
            last = out
            if stream:
                tokens += len(out.outputs[0].token_ids)
                text = held + out.outputs[0].text
                if not sent:
                    text = text.lstrip()
                piece = text.rstrip()
                held = text[len(piece):]  # white space is sent only when more text follows it
                if piece:
                    sent = True
                    yield piece
        if last is None:
            raise RuntimeError("the engine returned nothing")
        prompt_tokens = len(embeds)
        if stream:
            yield {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                   "finish_reason": "length" if last.outputs[0].finish_reason == "length" else "stop"}
        else:
            done = [finish(o, prompt_tokens) for o in sorted(last.outputs, key=lambda o: o.index)]
            yield done * sampling.n if len(done) == 1 else done

    async def check_health(self) -> None:
        await self.engine.check_health()  # raises when the engine's process has died

    def shutdown(self) -> None:
        self.engine.shutdown()
