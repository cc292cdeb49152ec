"""The Ray Serve applications: one model application and four light ingress applications over
it (report generation, grounding, VQA, OpenAI-style chat), and the web page.

    model                      ModelServer (serve/model_server.py): the checkpoints and the
                               engine (vLLM, or transformers); no HTTP route; its replicas
                               autoscale on the load of all four routes together
    POST /mrg                  {"scenario", "images", "prior_images", "prior_report", "cot", "grounded", "stream"}
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

Each route is a FastAPI app behind Serve's ingress: its body is a pydantic model
(serve/inputs.py, serve/openai_chat.py) and its answer one too (serve/prompts.py); its work is
the handler in serve/client.py that the web page calls as well, which writes the prompt and
calls the model application through a handle (its `model_app` arg names it), with the checkpoint
as the handle's multiplexed model id. A field a route does not know is a 400 naming it; every
4xx is {"error": "..."} (OpenAI's error object on /v1). With API keys set (serve/access.py)
every route needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, StreamingResponse

from m4cxr.ray_cluster import init_ray
from m4cxr.serve.access import authorized, key_hashes
from m4cxr.serve.client import (
    ModelClient, answer_chat, answer_grounding, answer_report, answer_vqa, stream_chat, stream_report,
)
from m4cxr.serve.inputs import Body, GroundingRequest, ReportRequest, RequestError, VQARequest, parse_json, request_error
from m4cxr.model.vllm_engine import ENGINES
from m4cxr.serve.model_server import ModelServer, serve_options
from m4cxr.serve.openai_chat import ChatRequest, chat_response, chunk, completion_id, sse, usage
from m4cxr.serve.prompts import BoxAnswer, GroundingAnswer, ReportAnswer, VQAAnswer

log = logging.getLogger("ray.serve")


RETRY_AFTER_S = 10  # a model replica that died is replaced within about this (a health check or two)


def error_headers(status: int) -> dict[str, str] | None:
    return {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": str(RETRY_AFTER_S)}}.get(status)


def error_response(err: RequestError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status, headers=error_headers(err.status))


def openai_error(err: RequestError) -> JSONResponse:
    """An error in OpenAI's shape, which its clients read the message from."""
    kind = {401: "authentication_error", 404: "not_found_error"}.get(err.status, "invalid_request_error")
    return JSONResponse({"error": {"message": err.message, "type": kind, "param": None, "code": err.status}},
                        status_code=err.status, headers=error_headers(err.status))


def check_access(request: Request, hashes: list[str]) -> None:
    if not authorized(request.headers.get("authorization"), hashes):
        raise RequestError("missing or invalid API key: send the header 'Authorization: Bearer <key>'", 401)


async def read_request(client: ModelClient, request: Request, kind: type[Body], **context: Any) -> tuple[str, Any]:
    """The checkpoint a request names and its body as the route's request model: the API key
    first, then the JSON, then the checkpoint, then the fields (a ValidationError, which the
    route's exception handler answers)."""
    check_access(request, client.api_key_hashes)
    body = parse_json(await request.body())
    name = client.check_model(body.get("model") or request.headers.get("serve_multiplexed_model_id") or client.default)
    return name, kind.model_validate(body, context=context)


class PrefixIsRoot:
    """Serve mounts a route's app at its prefix, and a request for the prefix itself (POST /mrg)
    reaches it with an empty path: here that is the app's "/", not a redirect to /mrg/ (which a
    client does not follow with its POST)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == scope.get("root_path"):
            scope = {**scope, "path": scope["path"] + "/"}
        await self.app(scope, receive, send)


def route_api(kind: type[Body], answer_error=error_response, routes: str = "") -> FastAPI:
    """A route's FastAPI app (`routes`: its paths, as a 404 names them), every error answered in
    the route's JSON: a RequestError as itself, a ValidationError of its request model in the
    words of request_error, a wrong method or path by name."""
    api = FastAPI(title=f"M4CXR {kind.route}")
    api.add_middleware(PrefixIsRoot)

    def http_error(request: Request, err: HTTPException) -> JSONResponse:
        path = request.url.path.rstrip("/")
        if err.status_code == 405:
            return answer_error(RequestError(f"use {(err.headers or {}).get('Allow', 'POST')} for {path}", 405))
        return answer_error(RequestError(f"no route {path}; use {routes or 'POST ' + request.scope['root_path']}",
                                         err.status_code))

    api.add_exception_handler(RequestError, lambda request, err: answer_error(err))
    api.add_exception_handler(ValidationError, lambda request, err: answer_error(request_error(err, kind)))
    api.add_exception_handler(HTTPException, http_error)
    return api


# Serve freezes (pickles) a route's app when its class is decorated, before the class's name is
# bound: what a route's methods call must be defined above the class.
mrg_api, grounding_api, vqa_api = route_api(ReportRequest), route_api(GroundingRequest), route_api(VQARequest)
chat_api = route_api(ChatRequest, openai_error, "/v1/chat/completions or /v1/models")


async def report_events(first: tuple, pieces):
    """The findings, then the report, piece by piece as they are written, then the whole answer
    as the unstreamed route gives it, then [DONE]; an error ends the stream with an error event."""
    def event(part: str, item) -> str:
        return sse(item.model_dump() if part == "done" else {"part": part, "text": item})

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
@serve.ingress(mrg_api)
class MRGService(ModelClient):
    @mrg_api.post("/", response_model=ReportAnswer)
    async def post(self, request: Request):
        name, req = await read_request(self, request, ReportRequest)
        if not req.stream:
            return await answer_report(self, name, req)
        pieces = stream_report(self, name, req)
        first = await pieces.__anext__()  # a problem with the prompt is the route's 4xx, before the stream
        return StreamingResponse(report_events(first, pieces), media_type="text/event-stream")


@serve.deployment(max_ongoing_requests=32, max_queued_requests=128)
@serve.ingress(grounding_api)
class GroundingService(ModelClient):
    @grounding_api.post("/", response_model=GroundingAnswer | BoxAnswer)
    async def post(self, request: Request):
        return await answer_grounding(self, *await read_request(self, request, GroundingRequest))


@serve.deployment(max_ongoing_requests=32, max_queued_requests=128)
@serve.ingress(vqa_api)
class VQAService(ModelClient):
    @vqa_api.post("/", response_model=VQAAnswer)
    async def post(self, request: Request):
        return await answer_vqa(self, *await read_request(self, request, VQARequest))


# ----------------------------------------------------------------------------- OpenAI-style chat


async def chat_events(name: str, pieces, include_usage: bool):
    """The chat answer as OpenAI's chunks: the role, the text as it comes, the finish reason, the
    usage (when asked), then [DONE]. An error mid-way ends the stream with an error event."""
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


@serve.deployment(max_ongoing_requests=16, max_queued_requests=64)
@serve.ingress(chat_api)
class ChatService(ModelClient):
    @chat_api.get("/models")
    async def models(self, request: Request):
        check_access(request, self.api_key_hashes)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "m4cxr"}
                                           for name in self.checkpoints]}

    @chat_api.post("/chat/completions")
    async def completions(self, request: Request):
        name, req = await read_request(self, request, ChatRequest, max_new_tokens=self.max_new_tokens)
        sampling = req.sampling(self.max_new_tokens)
        if req.stream:
            pieces = await stream_chat(self, name, req.turns, req.images, sampling)
            return StreamingResponse(chat_events(name, pieces, req.include_usage), media_type="text/event-stream")
        return chat_response(name, await answer_chat(self, name, req.turns, req.images, sampling))


# ----------------------------------------------------------------------------- building and running

SERVICES = {"mrg": MRGService, "grounding": GroundingService, "vqa": VQAService, "v1": ChatService}
BOTH_ARGS = ("checkpoints", "default", "max_new_tokens")
MODEL_ARGS = ("engine", "engine_args", "max_batch_size", "batch_wait_timeout_s", "use_gpu",
              "max_prompt_tokens")  # the model application's
ROUTE_ARGS = ("api_keys", "api_keys_file", "retry_after_s", "model_app", "host",
              "allow_unauthenticated")  # a route's
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
    hashes = key_hashes(args.get("api_keys"), args.get("api_keys_file", ""))
    check_closed_off_the_machine(f"application {name}", args.get("host", "127.0.0.1"), hashes,
                                 args.get("allow_unauthenticated", False))
    return deployment.options(**options).bind(
        checkpoints=list(checkpoints), default=default, max_new_tokens=args.get("max_new_tokens", 256),
        api_key_hashes=hashes, model_app=args.get("model_app", "model"))


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_closed_off_the_machine(what: str, host: str, hashes: list[str], allow_unauthenticated: Any) -> None:
    """A route that listens beyond this machine (`host`: the HTTP address Serve binds, args.host
    in a config file) needs API keys, unless its args say `allow_unauthenticated: true`."""
    if not isinstance(allow_unauthenticated, bool):
        raise ValueError(f"{what}: args.allow_unauthenticated must be true or false, "
                         f"got {allow_unauthenticated!r}")
    if host in LOOPBACK or hashes or allow_unauthenticated:
        return
    raise ValueError(
        f"{what} would listen on {host}, beyond this machine, with no API keys: anyone who "
        f"reaches it could send studies and read reports. Set keys: a file of keys, one per line "
        f"(args.api_keys_file, `m4cxr serve --api-keys-file`), args.api_keys, or the environment variable "
        f"M4CXR_API_KEYS=key1,key2 where Serve runs; clients then send 'Authorization: Bearer <key>'. Or, "
        f"to serve it open on purpose, set args.allow_unauthenticated: true (`--allow-unauthenticated`).")


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
    unknown = sorted(set(args) - set(BOTH_ARGS + MODEL_ARGS + ROUTE_ARGS + DEPLOYMENT_ARGS))
    if unknown:
        raise ValueError(f"run_services: unknown args {unknown}")
    named = (lambda app: f"{prefix}-{app}") if prefix else (lambda app: app)
    args = {"checkpoints": checkpoints, "model_app": named("model"), "host": host, **args}
    hashes = key_hashes(args.get("api_keys"), args.get("api_keys_file", ""))  # refused before Serve starts
    check_closed_off_the_machine("the services", host, hashes, args.get("allow_unauthenticated", False))
    init_ray()
    serve.start(http_options={"host": host, "port": port})
    model_args = {k: v for k, v in args.items() if k not in ROUTE_ARGS}
    route_args = {k: v for k, v in args.items() if k not in MODEL_ARGS + DEPLOYMENT_ARGS}
    serve.run(build("model", model_args), name=args["model_app"], route_prefix=None)
    for name in apps:
        serve.run(build(name, route_args), name=named(name), route_prefix=f"/{prefix}/{name}" if prefix else f"/{name}")
    return f"http://{host}:{port}/{prefix}" if prefix else f"http://{host}:{port}"
