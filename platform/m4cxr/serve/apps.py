"""The Ray Serve applications: report generation, grounding, VQA, and OpenAI-style chat.

Each is its own application and deployment (own replicas, autoscaling and queue limits, set in
serve_apps/config.yaml or by `run_services`), over the shared ModelServer code path.

    POST /mrg                  {"scenario", "images", "prior_images", "prior_report", "cot"}
                               -> {"findings": [...], "findings_text": "...", "report": "..."}
    POST /grounding            {"image", "phrase" | "finding" | "organ" | "region"}
                               -> {"box": [x1,y1,x2,y2] (0-100), "box_pixels": [...], "answer"}
                               {"image", "box", "ask": finding|organ|region|phrase} -> {"answer"}
    POST /vqa                  {"images": [one] or [reference, main], "question"} -> {"answer"}
    POST /v1/chat/completions  OpenAI chat (text and image_url parts), multi-turn
    GET  /v1/models            the served checkpoints
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from m4cxr.serve.inputs import (
    RequestError, decode_image, parse_grounding, parse_json, parse_mrg, parse_vqa,
)
from m4cxr.serve.model_server import ModelServer, error_response, serve_options
from m4cxr.serve.prompts import findings_list, grounding_response, grounding_turns, mrg_turns, vqa_turns


@serve.deployment(max_ongoing_requests=16, max_queued_requests=64)
class MRGService(ModelServer):
    async def respond(self, model, body: dict) -> dict[str, Any]:
        req = parse_mrg(body)
        first, second, images = mrg_turns(req, model.system_prompt)
        answer = await self.answer(model, first, images)
        if not req["cot"]:
            return {"findings": [], "findings_text": "", "report": answer}
        report = await self.answer(model, first + [{"role": "assistant", "content": answer}] + second, images)
        return {"findings": findings_list(answer), "findings_text": answer, "report": report}


@serve.deployment(max_ongoing_requests=16, max_queued_requests=64)
class GroundingService(ModelServer):
    async def respond(self, model, body: dict) -> dict[str, Any]:
        req = parse_grounding(body)
        answer = await self.answer(model, grounding_turns(req, model.system_prompt), [req["image"]])
        return grounding_response(req, answer, model.box_convention)


@serve.deployment(max_ongoing_requests=16, max_queued_requests=64)
class VQAService(ModelServer):
    async def respond(self, model, body: dict) -> dict[str, Any]:
        req = parse_vqa(body)
        return {"answer": await self.answer(model, vqa_turns(req, model.system_prompt), req["images"])}


# ----------------------------------------------------------------------------- OpenAI-style chat


def chat_conversation(messages: Any, system: str) -> tuple[list[dict], list]:
    """OpenAI messages -> our conversation (each image part becomes an <image> at its place)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("field 'messages' must be a non-empty list")
    conv, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"{where} must be an object with role system, user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = content
        else:
            raise RequestError(f"{where}.content must be a string or a list of parts")
        texts = []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = str(part.get("text", ""))
                if "<image>" in text:
                    raise RequestError(f"{where}.content[{j}]: send images as image_url parts, not '<image>' text")
                texts.append(text)
            elif kind == "image_url" and m["role"] == "user":
                url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
                images.append(decode_image(url, f"{where}.content[{j}].image_url.url"))
                texts.append("<image>")
            else:
                raise RequestError(f"{where}.content[{j}]: unsupported part {kind!r} (text, or image_url in user turns)")
        conv.append({"role": m["role"], "content": " ".join(t.strip() for t in texts if t.strip())})
    if conv[0]["role"] != "system":
        conv.insert(0, {"role": "system", "content": system})
    if conv[-1]["role"] != "user":
        raise RequestError("the last message must be the user's")
    return conv, images


@serve.deployment(max_ongoing_requests=16, max_queued_requests=64)
class ChatService(ModelServer):
    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/")
        try:
            if path.endswith("/models"):
                return JSONResponse({"object": "list", "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "m4cxr"} for name in self.checkpoints]})
            if not path.endswith("/chat/completions"):
                raise RequestError(f"no route {request.url.path}; use /v1/chat/completions or /v1/models", 404)
            if request.method != "POST":
                raise RequestError("use POST for /v1/chat/completions", 405)
            body = parse_json(await request.body())
            if body.get("stream"):
                raise RequestError("streaming is not supported; send stream: false")
            name = self.model_id(body)
            model = await self.get_model(name)
            conv, images = chat_conversation(body.get("messages"), model.system_prompt)
            answer = await self.answer(model, conv, images)
        except RequestError as err:
            return error_response(err)
        prompt_tokens = len(model.tokenizer(" ".join(t["content"] for t in conv))["input_ids"]) + \
            len(images) * model.tokens_per_image
        completion_tokens = len(model.tokenizer(answer)["input_ids"])
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })


# ----------------------------------------------------------------------------- building and running

SERVICES = {"mrg": MRGService, "grounding": GroundingService, "vqa": VQAService, "v1": ChatService}
SERVER_ARGS = ("default", "max_batch_size", "batch_wait_timeout_s", "max_new_tokens", "use_gpu", "max_prompt_tokens")


def build(name: str, args: dict[str, Any]):
    """An application from `serve run` args: checkpoints {name: folder}, server and deployment options."""
    checkpoints = args.get("checkpoints") or {}
    if isinstance(checkpoints, str):
        checkpoints = {"default": checkpoints}
    if not checkpoints:
        raise ValueError(f"application {name}: args.checkpoints must name at least one checkpoint folder")
    checkpoints = {k: str(Path(v).resolve()) for k, v in checkpoints.items()}
    for k, v in checkpoints.items():
        if not (Path(v) / "m4cxr.json").is_file():
            raise FileNotFoundError(f"application {name}: checkpoint {k!r} at {v} is not an M4CXR checkpoint")
    server = {k: args[k] for k in SERVER_ARGS if k in args}
    if "default" not in server:
        server["default"] = next(iter(checkpoints))
    deployment = SERVICES[name]
    options = serve_options(args)
    actor = options.setdefault("ray_actor_options", {})
    if server.get("use_gpu"):
        actor.setdefault("num_gpus", 1)
    actor.setdefault("num_cpus", 1 if server.get("use_gpu") else 0.25)  # four services share a small machine
    return deployment.options(**options).bind(checkpoints=checkpoints, **server)


def mrg_app(args: dict[str, Any]):
    return build("mrg", args)


def grounding_app(args: dict[str, Any]):
    return build("grounding", args)


def vqa_app(args: dict[str, Any]):
    return build("vqa", args)


def chat_app(args: dict[str, Any]):
    return build("v1", args)


def run_services(checkpoints: dict[str, str] | str, port: int = 8000, host: str = "127.0.0.1",
                 apps: tuple[str, ...] = ("mrg", "grounding", "vqa", "v1"), **args: Any) -> str:
    """Start the applications on this Ray cluster; returns the base URL."""
    from m4cxr.ray_cluster import init_ray

    init_ray()
    serve.start(http_options={"host": host, "port": port})
    for name in apps:
        serve.run(build(name, {"checkpoints": checkpoints, **args}), name=name, route_prefix=f"/{name}")
    return f"http://{host}:{port}"
