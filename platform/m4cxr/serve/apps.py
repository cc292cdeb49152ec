"""The Ray Serve applications: one model application and four light ingress applications over
it (report generation, grounding, VQA, OpenAI-style chat), and the web page.

    model                      ModelServer (serve/model_server.py): the checkpoints and the
                               engine (vLLM, or transformers); no HTTP route; its replicas
                               autoscale on the load of all four routes together
    POST /mrg                  {"scenario", "images", "prior_images", "prior_report", "cot", "stream"}
                               -> {"findings": [...], "findings_text": "...", "report": "..."};
                               with stream: server-sent events {"part": "findings"|"report",
                               "text": piece} as the answers are written, then that object
    POST /grounding            {"image", "phrase" | "finding" | "organ" | "region"}
                               -> {"box": [x1,y1,x2,y2] (0-100), "box_pixels": [...], "answer"}
                               {"image", "box", "ask": finding|organ|region|phrase} -> {"answer"}
    POST /vqa                  {"images": [one] or [reference, main], "question"} -> {"answer"}
    POST /v1/chat/completions  OpenAI chat (text and image_url parts), multi-turn; streaming,
                               sampling, n, stop, seed and token limits (serve/openai_chat.py)
    GET  /v1/models            the served checkpoints
    GET  /ui/                  the web page (serve/ui.py, Gradio) over the same model application

An ingress checks the request, writes the prompt and calls the model application through a
handle (its `model_app` arg names it), with the checkpoint as the handle's multiplexed model id.
A field a route does not know is a 400 naming it. With API keys set (serve/access.py) every
route needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from m4cxr.serve.access import authorized, key_hashes
from m4cxr.serve.inputs import (
    RequestError, decode_image, parse_grounding, parse_json, parse_mrg, parse_vqa,
)
from m4cxr.serve.model_server import ENGINES, ModelServer, serve_options
from m4cxr.serve.openai_chat import (
    CHAT_FIELDS, Sampling, chat_response, chunk, completion_id, parse_sampling, parse_stream, reject_unknown, sse,
    usage,
)
from m4cxr.serve.prompts import findings_list, grounding_response, grounding_turns, mrg_turns, vqa_turns

log = logging.getLogger("ray.serve")


RETRY_AFTER_S = 10  # a model replica that died is replaced within about this (a health check or two)


def error_headers(status: int) -> dict[str, str] | None:
    return {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": str(RETRY_AFTER_S)}}.get(status)


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status, headers=error_headers(err.status))


def check_access(request: Request, hashes: list[str]) -> None:
    if not authorized(request.headers.get("authorization"), hashes):
        raise RequestError("missing or invalid API key: send the header 'Authorization: Bearer <key>'", 401)


def raise_error(out: Any) -> None:
    if isinstance(out, dict) and "error" in out:  # the model application's 4xx (or 503)
        raise RequestError(out["error"], out["status"])


async def model_call(call):
    """A call to the model application; a replica that died under it (its process killed, its
    node lost) is a 503 to retry, not a 500."""
    from ray.exceptions import RayActorError

    try:
        return await call
    except RayActorError as err:
        raise RequestError(f"the model replica stopped ({type(err).__name__}); retry shortly", 503) from err


class ModelClient:
    """What every route and the web page share: the checkpoints, the one a request names, and
    calls to the model application."""

    def __init__(self, checkpoints: list[str], default: str = "default", max_new_tokens: int = 256,
                 api_key_hashes: list[str] | None = None, model_app: str = "model"):
        self.checkpoints = list(checkpoints)
        self.default = default
        self.max_new_tokens = max_new_tokens
        self.api_key_hashes = list(api_key_hashes or [])
        self.model_app = model_app
        self.infos: dict[str, dict] = {}
        self.handle = None

    def model(self, name: str):
        if self.handle is None:  # at the first request: applications of one config file start in any order
            self.handle = serve.get_app_handle(self.model_app)
        return self.handle.options(multiplexed_model_id=name)

    def model_id(self, request: Request, body: dict | None = None) -> str:
        name = (body or {}).get("model") or request.headers.get("serve_multiplexed_model_id") or self.default
        return self.check_model(name)

    def check_model(self, name: str) -> str:
        if name not in self.checkpoints:
            raise RequestError(f"unknown model {name!r}; served: {self.checkpoints}", 404)
        return name

    async def info(self, name: str) -> dict:
        if name not in self.infos:
            out = await model_call(self.model(name).describe.remote())
            raise_error(out)
            self.infos[name] = out
        return self.infos[name]

    async def answer_details(self, name: str, conversation: list[dict], images: list, sampling: Sampling) -> list[dict]:
        out = await model_call(self.model(name).generate.remote(conversation, images, sampling))
        raise_error(out)
        return out

    async def answer(self, name: str, conversation: list[dict], images: list) -> str:
        """The greedy answer within this route's token limit (the task routes)."""
        return (await self.answer_details(name, conversation, images, Sampling(self.max_new_tokens)))[0]["text"]

    async def answer_stream(self, name: str, conversation: list[dict], images: list, sampling: Sampling | None = None):
        """The answer's text pieces as they come, then its details (a dict); greedy within the
        route's token limit unless `sampling` says otherwise. A problem with the prompt is raised
        before the first piece (the route's 4xx), not inside the stream."""
        sampling = sampling or Sampling(self.max_new_tokens)
        pieces = self.model(name).options(stream=True).stream.remote(conversation, images, sampling)
        first = await model_call(pieces.__anext__())
        raise_error(first)

        async def items():
            yield first
            async for item in pieces:
                raise_error(item)
                yield item

        return items()

    async def report_pieces(self, name: str, req: dict[str, Any]):
        """A checked report request's answers as they are written: ("findings", piece) while the
        CoT's first turn is written, then ("report", piece), then ("done", the whole answer as the
        unstreamed route gives it). A problem with the prompt is raised before the first piece."""
        first, second, images = mrg_turns(req, (await self.info(name))["system_prompt"])
        pieces = await self.answer_stream(name, first, images)
        texts = {"findings": "", "report": ""}
        for part in ("findings", "report") if req["cot"] else ("report",):
            if part == "report" and req["cot"]:
                conversation = first + [{"role": "assistant", "content": texts["findings"]}] + second
                pieces = await self.answer_stream(name, conversation, images)
            async for item in pieces:
                if isinstance(item, str):
                    texts[part] += item
                    yield part, item
            texts[part] = texts[part].strip()
        yield "done", {"findings": findings_list(texts["findings"]) if req["cot"] else [],
                       "findings_text": texts["findings"], "report": texts["report"]}


class Ingress(ModelClient):
    """A route: access, parsing, and any RequestError as its 4xx."""

    async def __call__(self, request: Request) -> JSONResponse:
        """Parse, answer with the route's `respond`, and turn any RequestError into its 4xx."""
        try:
            check_access(request, self.api_key_hashes)
            if request.method != "POST":
                raise RequestError(f"use POST for {request.url.path}", 405)
            body = parse_json(await request.body())
            name = self.model_id(request, body)
            out = await self.respond(name, await self.info(name), body)
            return out if isinstance(out, StreamingResponse) else JSONResponse(out)
        except RequestError as err:
            return error_response(err)

    async def respond(self, name: str, info: dict, body: dict) -> dict | StreamingResponse:
        raise NotImplementedError  # each route answers its own


@serve.deployment(max_ongoing_requests=32, max_queued_requests=128)
class MRGService(Ingress):
    async def respond(self, name: str, info: dict, body: dict) -> dict[str, Any] | StreamingResponse:
        reject_unknown(body, ("model", "scenario", "images", "prior_images", "prior_report", "cot", "stream"), "/mrg")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("field 'stream' must be true or false")
        req = parse_mrg(body)
        if stream:
            pieces = self.report_pieces(name, req)
            first = await pieces.__anext__()  # a problem with the prompt is the route's 4xx, before the stream
            return StreamingResponse(self.report_events(first, pieces), media_type="text/event-stream")
        first, second, images = mrg_turns(req, info["system_prompt"])
        answer = await self.answer(name, first, images)
        if not req["cot"]:
            return {"findings": [], "findings_text": "", "report": answer}
        report = await self.answer(name, first + [{"role": "assistant", "content": answer}] + second, images)
        return {"findings": findings_list(answer), "findings_text": answer, "report": report}

    async def report_events(self, first: tuple, pieces):
        """The findings, then the report, piece by piece as they are written, then the whole
        answer as the unstreamed route gives it, then [DONE]; an error ends the stream with an
        error event."""
        def event(part: str, item) -> str:
            return sse(item if part == "done" else {"part": part, "text": item})

        try:
            yield event(*first)
            async for part, item in pieces:
                yield event(part, item)
        except RequestError as err:
            yield sse({"error": err.message, "status": err.status})
        except Exception as err:
            log.exception("report stream failed")
            yield sse({"error": f"generation failed: {type(err).__name__}: {err}", "status": 500})
        yield sse("[DONE]")


@serve.deployment(max_ongoing_requests=32, max_queued_requests=128)
class GroundingService(Ingress):
    async def respond(self, name: str, info: dict, body: dict) -> dict[str, Any]:
        reject_unknown(body, ("model", "image", "box", "ask", "phrase", "finding", "organ", "region"), "/grounding")
        req = parse_grounding(body)
        answer = await self.answer(name, grounding_turns(req, info["system_prompt"]), [req["image"]])
        return grounding_response(req, answer, info["box_convention"])


@serve.deployment(max_ongoing_requests=32, max_queued_requests=128)
class VQAService(Ingress):
    async def respond(self, name: str, info: dict, body: dict) -> dict[str, Any]:
        reject_unknown(body, ("model", "images", "question"), "/vqa")
        req = parse_vqa(body)
        return {"answer": await self.answer(name, vqa_turns(req, info["system_prompt"]), req["images"])}


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


def openai_error(err: RequestError) -> JSONResponse:
    """An error in OpenAI's shape, which its clients read the message from."""
    kind = {401: "authentication_error", 404: "not_found_error"}.get(err.status, "invalid_request_error")
    return JSONResponse({"error": {"message": err.message, "type": kind, "param": None, "code": err.status}},
                        status_code=err.status, headers=error_headers(err.status))


@serve.deployment(max_ongoing_requests=16, max_queued_requests=64)
class ChatService(Ingress):
    async def __call__(self, request: Request):
        path = request.url.path.rstrip("/")
        try:
            check_access(request, self.api_key_hashes)
            if path.endswith("/models"):
                return JSONResponse({"object": "list", "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "m4cxr"} for name in self.checkpoints]})
            if not path.endswith("/chat/completions"):
                raise RequestError(f"no route {request.url.path}; use /v1/chat/completions or /v1/models", 404)
            if request.method != "POST":
                raise RequestError("use POST for /v1/chat/completions", 405)
            body = parse_json(await request.body())
            reject_unknown(body, CHAT_FIELDS, "/v1/chat/completions")
            stream, include_usage = parse_stream(body)
            sampling = parse_sampling(body, self.max_new_tokens)
            if stream and sampling.n > 1:
                raise RequestError("n > 1 with stream: true is not supported; send one or the other")
            name = self.model_id(request, body)
            conv, images = chat_conversation(body.get("messages"), (await self.info(name))["system_prompt"])
            if stream:
                pieces = await self.answer_stream(name, conv, images, sampling)
                return StreamingResponse(self.chat_events(name, pieces, include_usage), media_type="text/event-stream")
            details = await self.answer_details(name, conv, images, sampling)
        except RequestError as err:
            return openai_error(err)
        return JSONResponse(chat_response(name, details))

    async def chat_events(self, name: str, pieces, include_usage: bool):
        """The chat answer as OpenAI's chunks: the role, the text as it comes, the finish reason,
        the usage (when asked), then [DONE]. An error mid-way ends the stream with an error event."""
        cid, created = completion_id(), int(time.time())
        yield sse(chunk(cid, name, created, {"role": "assistant", "content": ""}))
        try:
            async for item in pieces:
                if isinstance(item, str):
                    yield sse(chunk(cid, name, created, {"content": item}))
                else:
                    yield sse(chunk(cid, name, created, {}, finish_reason=item["finish_reason"]))
                    if include_usage:
                        yield sse(chunk(cid, name, created, {}, with_usage=usage(item["prompt_tokens"],
                                                                                 item["completion_tokens"])))
        except Exception as err:
            log.exception("chat stream failed")
            yield sse({"error": {"message": f"generation failed: {type(err).__name__}: {err}", "type": "server_error"}})
        yield sse("[DONE]")


# ----------------------------------------------------------------------------- building and running

SERVICES = {"mrg": MRGService, "grounding": GroundingService, "vqa": VQAService, "v1": ChatService}
BOTH_ARGS = ("checkpoints", "default", "max_new_tokens")
MODEL_ARGS = ("engine", "engine_args", "max_batch_size", "batch_wait_timeout_s", "use_gpu",
              "max_prompt_tokens")  # the model application's
ROUTE_ARGS = ("api_keys", "api_keys_file", "retry_after_s", "model_app")  # a route's
DEPLOYMENT_ARGS = ("max_ongoing_requests", "max_queued_requests", "autoscaling_config", "ray_actor_options",
                   "health_check_period_s", "health_check_timeout_s")


def build(name: str, args: dict[str, Any]):
    """An application from `serve run` args: "model" (ModelServer over checkpoints {name: folder})
    or an ingress route (mrg, grounding, vqa, v1) over the model application `model_app`."""
    if name != "model" and name not in SERVICES and name != "ui":
        raise ValueError(f"no application {name!r}; choose model, ui or one of {list(SERVICES)}")
    checkpoints = args.get("checkpoints") or {}
    if isinstance(checkpoints, str):
        checkpoints = {"default": checkpoints}
    if not checkpoints:
        raise ValueError(f"application {name}: args.checkpoints must name at least one checkpoint folder")
    checkpoints = {k: str(Path(v).resolve()) for k, v in checkpoints.items()}
    for k, v in checkpoints.items():
        if not (Path(v) / "m4cxr.json").is_file():
            raise FileNotFoundError(f"application {name}: checkpoint {k!r} at {v} is not an M4CXR checkpoint")
    known = BOTH_ARGS + (MODEL_ARGS if name == "model" else ROUTE_ARGS) + DEPLOYMENT_ARGS
    unknown = sorted(set(args) - set(known))
    if unknown:  # e.g. max_batch_size given to a route, which does not batch: say so, not ignore it
        raise ValueError(f"application {name}: args {unknown} are not its own; it takes {list(known)}")
    default = args.get("default") or next(iter(checkpoints))
    options = serve_options(args)
    actor = options.setdefault("ray_actor_options", {})
    if name == "model":
        if args.get("engine", "auto") not in ENGINES:
            raise ValueError(f"application model: args.engine must be one of {list(ENGINES)}, got {args['engine']!r}")
        server = {k: args[k] for k in MODEL_ARGS + ("max_new_tokens",) if k in args} | {"default": default}
        if server.get("use_gpu"):
            actor.setdefault("num_gpus", 1)
        actor.setdefault("num_cpus", 1 if server.get("use_gpu") else 0.25)
        return ModelServer.options(**options).bind(checkpoints=checkpoints, **server)
    actor.setdefault("num_cpus", 0.05)  # an ingress only checks requests and writes prompts
    if name == "ui":
        from m4cxr.serve.ui import UIService  # gradio is imported only where the page is served

        deployment = UIService
    else:
        deployment = SERVICES[name]
    # keys become hashes here: the replicas (and Serve's stored options) never hold a key itself
    return deployment.options(**options).bind(
        checkpoints=list(checkpoints), default=default, max_new_tokens=args.get("max_new_tokens", 256),
        api_key_hashes=key_hashes(args.get("api_keys"), args.get("api_keys_file", "")),
        model_app=args.get("model_app", "model"))


def model_app(args: dict[str, Any]):
    return build("model", args)


def mrg_app(args: dict[str, Any]):
    return build("mrg", args)


def grounding_app(args: dict[str, Any]):
    return build("grounding", args)


def vqa_app(args: dict[str, Any]):
    return build("vqa", args)


def chat_app(args: dict[str, Any]):
    return build("v1", args)


def ui_app(args: dict[str, Any]):
    return build("ui", args)


def run_services(checkpoints: dict[str, str] | str, port: int = 8000, host: str = "127.0.0.1",
                 apps: tuple[str, ...] = ("mrg", "grounding", "vqa", "v1", "ui"), prefix: str = "", **args: Any) -> str:
    """Start the model application and the routes over it on this Ray cluster; returns the base
    URL. `args` are the applications' (each takes its own); deployment options given here are the
    model application's (the routes' belong in a config file or `build`). With a prefix, the
    applications are named "<prefix>-model", "<prefix>-mrg", ... and the routes are
    /<prefix>/mrg, ... (another set of services beside the first)."""
    from m4cxr.ray_cluster import init_ray

    unknown = sorted(set(args) - set(BOTH_ARGS + MODEL_ARGS + ROUTE_ARGS + DEPLOYMENT_ARGS))
    if unknown:
        raise ValueError(f"run_services: unknown args {unknown}")
    init_ray()
    serve.start(http_options={"host": host, "port": port})
    named = (lambda app: f"{prefix}-{app}") if prefix else (lambda app: app)
    args = {"checkpoints": checkpoints, "model_app": named("model"), **args}
    model_args = {k: v for k, v in args.items() if k not in ROUTE_ARGS}
    route_args = {k: v for k, v in args.items() if k not in MODEL_ARGS + DEPLOYMENT_ARGS}
    serve.run(build("model", model_args), name=args["model_app"], route_prefix=None)
    for name in apps:
        serve.run(build(name, route_args), name=named(name), route_prefix=f"/{prefix}/{name}" if prefix else f"/{name}")
    return f"http://{host}:{port}/{prefix}" if prefix else f"http://{host}:{port}"
