"""The code path every service shares: checkpoints by name (serve.multiplexed), generation in
dynamic batches (serve.batch), a health check that generates, and JSON errors.

A request names its checkpoint with Serve's model-id header (`serve_multiplexed_model_id`; the
chat route also reads the body's "model"); without one, the default checkpoint answers. Each
batched call is one generation: requests queue for up to `batch_wait_timeout_s` and are answered
together, left-padded, so an answer is the same as it would be alone (fp32 on CPU). Items of a
batch that name different checkpoints are generated per checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from m4cxr.config import DEFAULT_SYSTEM_PROMPT
from m4cxr.serve.inputs import RequestError, parse_json

log = logging.getLogger("ray.serve")


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status)


class ModelServer:
    def __init__(self, checkpoints: dict[str, str], default: str = "default", max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.02, max_new_tokens: int = 256, use_gpu: bool = False,
                 max_prompt_tokens: int = 0):
        import torch

        if default not in checkpoints:
            raise ValueError(f"the default checkpoint {default!r} is not among {list(checkpoints)}")
        self.checkpoints = dict(checkpoints)
        self.default = default
        self.device = "cuda" if use_gpu else "cpu"
        self.dtype = torch.bfloat16 if use_gpu else None
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.system = DEFAULT_SYSTEM_PROMPT

    # -- checkpoints

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str):
        from m4cxr.model.checkpoint import load_checkpoint

        path = self.checkpoints.get(model_id)
        if path is None:
            raise RequestError(f"unknown model {model_id!r}; served: {list(self.checkpoints)}", 404)
        model, exp = await asyncio.to_thread(load_checkpoint, path, self.device, self.dtype)
        model.system_prompt = exp.data.system_prompt or DEFAULT_SYSTEM_PROMPT
        model.context_limit = self.max_prompt_tokens or exp.train.max_seq_len
        return model

    def model_id(self, body: dict | None = None) -> str:
        return (body or {}).get("model") or serve.get_multiplexed_model_id() or self.default

    # -- generation

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate_batch(self, items: list[tuple]) -> list[str]:
        """items: (model, conversation, images); one answer each."""
        answers: list[str | None] = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (model, _, _) in enumerate(items):
            groups.setdefault(id(model), []).append(i)
        for idx in groups.values():
            model = items[idx[0]][0]
            out = await asyncio.to_thread(model.generate, [items[i][1] for i in idx], [items[i][2] for i in idx],
                                          self.max_new_tokens)
            for i, a in zip(idx, out):
                answers[i] = a
        return answers  # type: ignore[return-value]

    async def answer(self, model, conversation: list[dict], images: list) -> str:
        self.check_length(model, conversation)
        return await self.generate_batch((model, conversation, images))

    def check_length(self, model, conversation: list[dict]) -> None:
        from m4cxr.model.tokenizer import encode_conversation

        ids, _ = encode_conversation(model.tokenizer, conversation, model.tokens_per_image, for_generation=True)
        if len(ids) + self.max_new_tokens > model.context_limit:
            raise RequestError(f"the prompt is {len(ids)} tokens; with {self.max_new_tokens} new tokens it is over "
                               f"the context limit of {model.context_limit}", 413)

    async def check_health(self) -> None:
        """Serve's health check: the default model must still generate (a replica that fails it
        is replaced)."""
        await probe_generation(await self.get_model(self.default))

    # -- requests

    async def __call__(self, request: Request) -> JSONResponse:
        """Parse, answer with the service's `respond`, and turn any RequestError into its 4xx."""
        try:
            if request.method != "POST":
                raise RequestError(f"use POST for {request.url.path}", 405)
            body = parse_json(await request.body())
            model = await self.get_model(self.model_id(body))
            return JSONResponse(await self.respond(model, body))
        except RequestError as err:
            return error_response(err)

    async def respond(self, model, body: dict) -> dict:
        raise NotImplementedError  # each service answers its own route


async def probe_generation(model) -> None:
    """Two tokens for a blank image; raises when the model cannot generate."""
    from PIL import Image

    conv = [{"role": "system", "content": model.system_prompt},
            {"role": "user", "content": "radiology image: <image> Answer the question. Is there a pneumothorax?"}]
    try:
        out = await asyncio.to_thread(model.generate, [conv], [[Image.new("L", (64, 64))]], 2)
    except Exception as err:
        raise RuntimeError(f"unhealthy: the model cannot generate ({type(err).__name__}: {err})") from err
    if not isinstance(out, list) or len(out) != 1 or not isinstance(out[0], str):
        raise RuntimeError(f"unhealthy: the model returned {out!r} for one prompt")


def serve_options(cfg: dict[str, Any]) -> dict[str, Any]:
    """Deployment options from a services config section (shared by the apps)."""
    from ray.serve.config import BackpressureConfig

    out = {k: cfg[k] for k in ("max_ongoing_requests", "max_queued_requests", "autoscaling_config",
                               "ray_actor_options") if k in cfg}
    if "retry_after_s" in cfg:  # over capacity: 503 with Retry-After rather than an ever longer queue
        out["backpressure_config"] = BackpressureConfig(status_code=503, retry_after_s=cfg["retry_after_s"])
    return out
