"""The model deployment: one per served base model, behind every route (serve/apps.py's
/mrg, /grounding, /vqa and /v1 are light ingress deployments that call it through a handle), so
requests of all tasks batch together in it and its replicas autoscale on their joint load.

It holds the checkpoints by name (serve.multiplexed): a call names its checkpoint with the
handle's multiplexed model id; without one, the default answers. Two engines generate:

- vllm (the default where vLLM is installed): the server encodes the images and writes each
  prompt as input embeddings (the images of requests that arrive within `batch_wait_timeout_s`
  encoded together); one vLLM engine per base LLM generates from them with continuous batching,
  the checkpoints over that base as its LoRA adapters (model/vllm_engine.py).
- hf: transformers' generate, batched here: requests queue for up to `batch_wait_timeout_s` and
  are answered together, left-padded, so an answer is the same as it would be alone (fp32 on
  CPU). Items of a batch that name different checkpoints or different generation settings
  (serve/openai_chat.py Sampling) are generated per group; a seeded request is a group of its
  own, so that its seed alone decides its samples. A streamed answer is generated on its own as
  it comes.

A request's problem (an unknown checkpoint, a prompt over the context limit) comes back as
{"error", "status"} rather than as an exception, so that the ingress answers it with its 4xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from ray import serve
from ray.serve.config import BackpressureConfig
from transformers import TextIteratorStreamer

from m4cxr.config import DEFAULT_SYSTEM_PROMPT
from m4cxr.model.checkpoint import load_checkpoint
from m4cxr.model.tokenizer import encode_conversation
from m4cxr.serve.inputs import RequestError
from m4cxr.serve.openai_chat import Sampling
from m4cxr.model.vllm_engine import resolve_engine, start_engines
from m4cxr.serve.vllm_engine import ServingEngine

log = logging.getLogger("ray.serve")


def read_evaluation(folder: str) -> dict | None:
    """The checkpoint's evaluation summary (eval/run.py writes evaluation.json beside it), if any."""
    path = Path(folder) / "evaluation.json"
    return json.loads(path.read_text()) if path.is_file() else None


@serve.deployment(max_ongoing_requests=64, max_queued_requests=256)
class ModelServer:
    def __init__(self, checkpoints: dict[str, str], default: str = "default", max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.02, max_new_tokens: int = 256, use_gpu: bool = False,
                 max_prompt_tokens: int = 0, engine: str = "auto", engine_args: dict[str, Any] | None = None):
        self.engines: dict[str, Any] = {}  # checkpoint name -> the vLLM engine that serves it (first: __del__ reads it)
        if default not in checkpoints:
            raise ValueError(f"the default checkpoint {default!r} is not among {list(checkpoints)}")
        self.checkpoints = dict(checkpoints)
        self.default = default
        self.device = "cuda" if use_gpu else "cpu"
        self.dtype = torch.bfloat16 if use_gpu else None
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        for batched in (self.generate_batch, self.embed_batch):
            batched.set_max_batch_size(max_batch_size)
            batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.engine = resolve_engine(engine)
        if engine_args and self.engine != "vllm":  # vLLM's settings would be silently unused
            raise ValueError(f"engine_args {sorted(engine_args)} are vLLM's, but the engine here is {self.engine!r}")
        if self.engine == "vllm":
            self.engines = start_engines(self.checkpoints, max_prompt_tokens, use_gpu, engine_args,
                                         engine_class=ServingEngine)

    def __del__(self):
        # getattr: an __init__ that failed before self.engines was set leaves nothing to stop
        for engine in set(getattr(self, "engines", {}).values()):
            try:
                engine.shutdown()
            except Exception:  # an engine whose process died has nothing left to stop
                log.warning("a vLLM engine did not shut down cleanly", exc_info=True)

    # -- checkpoints

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str):
        path = self.checkpoints.get(model_id)
        if path is None:
            raise RequestError(f"unknown model {model_id!r}; served: {list(self.checkpoints)}", 404)
        # with vLLM running the LLM, the server holds only the vision side and the input embeddings
        llm = "embeddings" if self.engine == "vllm" else "full"
        model, exp = await asyncio.to_thread(load_checkpoint, path, self.device, self.dtype, False, llm)
        model.name = model_id
        model.experiment = exp.name
        model.evaluation = read_evaluation(path)
        model.system_prompt = exp.data.system_prompt or DEFAULT_SYSTEM_PROMPT
        model.context_limit = self.max_prompt_tokens or exp.train.max_seq_len
        return model

    async def current_model(self):
        return await self.get_model(serve.get_multiplexed_model_id() or self.default)

    # -- what the ingress deployments call

    async def describe(self) -> dict[str, Any]:
        """What an ingress needs to write prompts and read answers for the named checkpoint."""
        try:
            model = await self.current_model()
        except RequestError as err:
            return {"error": err.message, "status": err.status}
        return {"system_prompt": model.system_prompt, "box_convention": model.box_convention, "engine": self.engine,
                "shares_engine_with": [n for n, e in self.engines.items() if e is self.engines.get(model.name)],
                "checkpoint": self.checkpoints[model.name], "experiment": model.experiment,
                "evaluation": model.evaluation}

    async def generate(self, conversation: list[dict], images: list, sampling: Sampling) -> list[dict] | dict:
        """The details of the request's n answers (model/m4cxr.py generate_details)."""
        try:
            return await self.answer_details(await self.current_model(), conversation, images, sampling)
        except RequestError as err:
            return {"error": err.message, "status": err.status}

    async def stream(self, conversation: list[dict], images: list, sampling: Sampling):
        """The answer's text pieces as they come, then its details (a dict) last."""
        try:
            model = await self.current_model()
            self.check_length(model, conversation, sampling.max_tokens)
            if self.engine == "vllm":
                embeds = await self.embed_batch((model, conversation, images))
                pieces = self.engines[model.name].generate(model.name, embeds, sampling, stream=True)
            else:
                pieces = self.stream_answer(model, conversation, images, sampling)  # checked above
            first = await anext(pieces)  # the engine may still refuse the request
        except RequestError as err:
            yield {"error": err.message, "status": err.status}
            return
        yield first
        async for item in pieces:
            yield item

    # -- generation

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate_batch(self, items: list[tuple]) -> list[list[dict]]:
        """items: (model, conversation, images, Sampling); each gets its n answers' details."""
        answers: list[list[dict] | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (model, _, _, sampling) in enumerate(items):
            key = (id(model), sampling) if sampling.seed is None else (id(model), sampling, i)
            groups.setdefault(key, []).append(i)
        for idx in groups.values():
            model, sampling = items[idx[0]][0], items[idx[0]][3]
            convs = [items[i][1] for i in idx for _ in range(sampling.n)]
            images = [items[i][2] for i in idx for _ in range(sampling.n)]
            out = await asyncio.to_thread(model.generate_details, convs, images, sampling.max_tokens,
                                          not sampling.greedy, sampling.temperature or 1.0, sampling.top_p,
                                          sampling.seed, sampling.stop)
            for k, i in enumerate(idx):
                answers[i] = out[k * sampling.n:(k + 1) * sampling.n]
        return answers  # type: ignore[return-value]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def embed_batch(self, items: list[tuple]) -> list:
        """items: (model, conversation, images); each gets its prompt embeddings (vLLM engine).
        vLLM batches generation continuously by itself; the images of requests that arrive
        together go through the vision encoder together, as the hf engine's do."""
        out: list = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (model, _, _) in enumerate(items):
            groups.setdefault(id(model), []).append(i)
        for idx in groups.values():
            model = items[idx[0]][0]
            embeds = await asyncio.to_thread(model.embed_prompts, [items[i][1] for i in idx], [items[i][2] for i in idx])
            for i, e in zip(idx, embeds):
                out[i] = e
        return out

    async def answer_details(self, model, conversation: list[dict], images: list, sampling: Sampling) -> list[dict]:
        self.check_length(model, conversation, sampling.max_tokens)
        if self.engine == "hf":
            return await self.generate_batch((model, conversation, images, sampling))
        embeds = await self.embed_batch((model, conversation, images))
        return [out async for out in self.engines[model.name].generate(model.name, embeds, sampling)][-1]

    async def stream_answer(self, model, conversation: list[dict], images: list, sampling: Sampling):
        """The answer's text as it is generated (pieces), then its details as the last item."""
        streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        result: dict = {}

        def run() -> None:
            try:
                result["details"] = model.generate_details(
                    [conversation], [images], sampling.max_tokens, not sampling.greedy, sampling.temperature or 1.0,
                    sampling.top_p, sampling.seed, sampling.stop, streamer=streamer)[0]
            except Exception as err:  # the stream ends; the error is raised below
                result["error"] = err
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        text, sent, hold = "", 0, max((len(s) for s in sampling.stop), default=1) - 1
        while True:
            piece = await asyncio.to_thread(next, streamer, None)
            if piece is None:
                break
            text += piece
            cut = min((text.find(s) for s in sampling.stop if s in text), default=-1)
            safe = cut if cut >= 0 else len(text) - hold  # a stop string may still be forming
            if safe > sent:
                chunk = text[sent:safe] if sent else text[:safe].lstrip()
                sent = safe
                if chunk:
                    yield chunk
            if cut >= 0:
                break
        await asyncio.to_thread(thread.join)
        if "error" in result:
            raise result["error"]
        if cut < 0 and len(text) > sent:
            rest = text[sent:].rstrip() if sent else text.strip()
            if rest:
                yield rest
        yield result["details"]

    def check_length(self, model, conversation: list[dict], new_tokens: int) -> None:
        """The model server's own limits: new tokens up to its max_new_tokens (whatever a route
        allows), prompt and new tokens within the context."""
        if new_tokens > self.max_new_tokens:
            raise RequestError(f"{new_tokens} new tokens asked; this model server generates at most "
                               f"{self.max_new_tokens}")
        ids, _ = encode_conversation(model.tokenizer, conversation, model.tokens_per_image, for_generation=True)
        if len(ids) + new_tokens > model.context_limit:
            raise RequestError(f"the prompt is {len(ids)} tokens; with {new_tokens} new tokens it is over "
                               f"the context limit of {model.context_limit}", 413)

    async def check_health(self) -> None:
        """Serve's health check: every vLLM engine's process is alive and the default model still
        generates (a replica that fails it is replaced)."""
        for engine in set(self.engines.values()):
            try:
                await engine.check_health()
            except Exception as err:
                raise RuntimeError(f"unhealthy: a vLLM engine is down ({type(err).__name__}: {err})") from err
        model = await self.get_model(self.default)

        async def two_tokens(conv, images):
            return [d["text"] for d in await self.answer_details(model, conv[0], images[0], Sampling(2))]

        await probe_generation(model, two_tokens if self.engine == "vllm" else None)


async def probe_generation(model, generate=None) -> None:
    """Two tokens for a blank image, from model.generate or the async `generate`; raises when the
    model cannot generate."""
    conv = [{"role": "system", "content": model.system_prompt},
            {"role": "user", "content": "radiology image: <image> Answer the question. Is there a pneumothorax?"}]
    try:
        images = [[Image.new("L", (64, 64))]]
        out = await (generate([conv], images) if generate else asyncio.to_thread(model.generate, [conv], images, 2))
    except Exception as err:
        raise RuntimeError(f"unhealthy: the model cannot generate ({type(err).__name__}: {err})") from err
    if not isinstance(out, list) or len(out) != 1 or not isinstance(out[0], str):
        raise RuntimeError(f"unhealthy: the model returned {out!r} for one prompt")


def serve_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """Deployment options from a services config section (shared by the apps)."""
    out = {k: cfg[k] for k in ("max_ongoing_requests", "max_queued_requests", "autoscaling_config",
                               "ray_actor_options", "health_check_period_s", "health_check_timeout_s") if k in cfg}
    if "retry_after_s" in cfg:  # over capacity: 503 with Retry-After rather than an ever longer queue
        out["backpressure_config"] = BackpressureConfig(status_code=503, retry_after_s=cfg["retry_after_s"])
    return out
