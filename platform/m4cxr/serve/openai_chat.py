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
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, PrivateAttr, ValidationInfo, model_validator

from m4cxr.serve.inputs import Body, RequestError, decode_image
from m4cxr.tasks import IMAGE

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


def number(low: float, high: float | None, integer: bool = False, null_is_default: bool = True) -> BeforeValidator:
    """A number field from low to high (high None: the server's max_new_tokens, given as the
    validation context); null is the default unless null_is_default is False."""
    def check(value: Any, info: ValidationInfo) -> Any:
        if value is None and null_is_default:
            return None
        top = info.context["max_new_tokens"] if high is None else high
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= top:
            kind = "an integer" if integer else "a number"
            raise RequestError(f"field '{info.field_name}' must be {kind} from {low} to {top}, got {value!r}")
        return value if integer else float(value)
    return BeforeValidator(check)


def stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and len(value) <= MAX_STOP and all(isinstance(s, str) for s in value)):
        raise RequestError(f"field 'stop' must be a string or a list of up to {MAX_STOP} strings")
    if any(not s for s in value):
        raise RequestError("field 'stop' must not hold empty strings")
    return tuple(value)


def stream_settings(value: Any) -> dict | None:
    if value and (not isinstance(value, dict) or set(value) - {"include_usage"}):
        raise RequestError("field 'stream_options' supports only {'include_usage': true|false}")
    return value or None


TokenLimit = Annotated[int | None, number(1, None, integer=True, null_is_default=False)]


class ChatRequest(Body):
    """POST /v1/chat/completions: OpenAI's request, the fields we honour (see the module's doc)."""
    route: ClassVar[str] = "/v1/chat/completions"
    model: str | None = None
    messages: Any = None
    stream: bool | None = None
    stream_options: Annotated[dict | None, BeforeValidator(stream_settings)] = None
    max_tokens: TokenLimit = None
    max_completion_tokens: TokenLimit = None
    temperature: Annotated[float | None, number(0, 2)] = None
    top_p: Annotated[float | None, number(0.01, 1)] = None
    n: Annotated[int | None, number(1, MAX_CHOICES, integer=True)] = None
    stop: Annotated[tuple[str, ...], BeforeValidator(stop_strings)] = ()
    seed: Annotated[int | None, number(0, 2**63 - 1, integer=True)] = None
    _turns: list[dict] = PrivateAttr(default_factory=list)  # the messages as our conversation
    _images: list = PrivateAttr(default_factory=list)  # their images, decoded, in order

    @model_validator(mode="after")
    def consistent(self) -> ChatRequest:
        if self.stream_options and not self.stream:
            raise RequestError("field 'stream_options' is only for stream: true")
        if {"max_tokens", "max_completion_tokens"} <= self.model_fields_set:
            raise RequestError("give max_tokens or max_completion_tokens, not both")
        if self.stream and (self.n or 1) > 1:
            raise RequestError("n > 1 with stream: true is not supported; send one or the other")
        self._turns, self._images = chat_turns(self.messages)
        return self

    @property
    def turns(self) -> list[dict]:
        return self._turns

    @property
    def images(self) -> list:
        return self._images

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage", False))

    def sampling(self, max_new_tokens: int) -> Sampling:
        """The generation settings; max_new_tokens is the server's cap (and the default)."""
        return Sampling(max_tokens=self.max_completion_tokens or self.max_tokens or max_new_tokens,
                        temperature=self.temperature or 0.0, top_p=1.0 if self.top_p is None else self.top_p,
                        n=self.n or 1, stop=self.stop, seed=self.seed)


def message_text(part: dict, where: str) -> str:
    text = str(part.get("text", ""))
    if IMAGE in text:
        raise RequestError(f"{where}: send images as image_url parts, not '{IMAGE}' text")
    return text


def chat_turns(messages: Any) -> tuple[list[dict], list]:
    """OpenAI messages -> our conversation's turns (each image part becomes an <image> at its
    place) and the images, decoded."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("field 'messages' must be a non-empty list")
    turns, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"{where} must be an object with role system, user or assistant")
        content = m.get("content")
        if not isinstance(content, (str, list)):
            raise RequestError(f"{where}.content must be a string or a list of parts")
        texts = []
        for j, part in enumerate([{"type": "text", "text": content}] if isinstance(content, str) else content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(message_text(part, f"{where}.content[{j}]"))
            elif kind == "image_url" and m["role"] == "user":
                url = part["image_url"].get("url") if isinstance(part.get("image_url"), dict) else None
                images.append(decode_image(url, f"{where}.content[{j}].image_url.url"))
                texts.append(IMAGE)
            else:
                raise RequestError(f"{where}.content[{j}]: unsupported part {kind!r} (text, or image_url in user turns)")
        turns.append({"role": m["role"], "content": " ".join(t.strip() for t in texts if t.strip())})
    if turns[-1]["role"] != "user":
        raise RequestError("the last message must be the user's")
    return turns, images


def with_system(turns: list[dict], system: str) -> list[dict]:
    """The conversation with the checkpoint's system prompt first, unless it has its own."""
    return turns if turns[0]["role"] == "system" else [{"role": "system", "content": system}] + turns


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
