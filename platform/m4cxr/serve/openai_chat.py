"""The OpenAI chat-completions contract: which request fields are honoured, how, and the shape
of answers and of streamed chunks (server-sent events).

Honoured: model, messages, stream (+ stream_options.include_usage), max_tokens /
max_completion_tokens, temperature, top_p, n, stop, seed. Any other field is a 400 that names it
(nothing is silently ignored). Without `temperature` the answer is greedy (the model's own
default: radiology answers should not vary from call to call); temperature 0 is greedy too.
With a seed, sampling is reproducible: a seeded request is generated on its own, not batched.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from m4cxr.serve.inputs import RequestError

CHAT_FIELDS = ("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "n", "stop", "seed")
MAX_CHOICES = 8
MAX_STOP = 4  # as OpenAI's API


@dataclass(frozen=True)
class Sampling:
    """How one request is generated; requests with equal settings (and no seed) batch together."""
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def reject_unknown(body: dict, allowed: tuple[str, ...], route: str) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestError(f"field(s) {unknown} are not supported by {route}; supported: {list(allowed)}")


def number(body: dict, name: str, low: float, high: float, integer: bool = False) -> Any:
    value = body[name]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise RequestError(f"field '{name}' must be {kind} from {low} to {high}, got {value!r}")
    return value


def parse_sampling(body: dict, max_new_tokens: int) -> Sampling:
    """The generation settings of a chat request, checked; max_new_tokens is the server's cap."""
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise RequestError("give max_tokens or max_completion_tokens, not both")
    limit_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = number(body, limit_name, 1, max_new_tokens, integer=True) if limit_name in body else max_new_tokens
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise RequestError(f"field 'stop' must be a string or a list of up to {MAX_STOP} strings")
    if any(not s for s in stop):
        raise RequestError("field 'stop' must not hold empty strings")
    return Sampling(
        max_tokens=int(max_tokens),
        temperature=float(number(body, "temperature", 0, 2)) if body.get("temperature") is not None else 0.0,
        top_p=float(number(body, "top_p", 0.01, 1)) if body.get("top_p") is not None else 1.0,
        n=int(number(body, "n", 1, MAX_CHOICES, integer=True)) if body.get("n") is not None else 1,
        stop=stop,
        seed=int(number(body, "seed", 0, 2**63 - 1, integer=True)) if body.get("seed") is not None else None,
    )


def parse_stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("field 'stream' must be true or false")
    options = body.get("stream_options") or {}
    if options and not stream:
        raise RequestError("field 'stream_options' is only for stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError("field 'stream_options' supports only {'include_usage': true|false}")
    return stream, bool(options.get("include_usage", False))


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:16]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(model: str, details: list[dict]) -> dict[str, Any]:
    """One answer per choice; usage counts the prompt once and every choice's tokens."""
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": d["text"]},
                     "finish_reason": d["finish_reason"]} for i, d in enumerate(details)],
        "usage": usage(details[0]["prompt_tokens"], sum(d["completion_tokens"] for d in details)),
    }


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def chunk(cid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
          with_usage: dict | None = None) -> dict[str, Any]:
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if with_usage is None else []}
    if with_usage is not None:
        out["usage"] = with_usage
    return out
