"""What the routes (serve/apps.py) and the web page (serve/ui.py) share: ModelClient, the calls
to the model application, and each route's body over it (report, grounding, vqa, chat), so that
the page answers exactly as the API does.

A call names its checkpoint with the handle's multiplexed model id; the model application's own
4xx (an unknown checkpoint, a prompt over the context) comes back as {"error", "status"} and is
raised here as a RequestError.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.exceptions import RayActorError

from m4cxr.serve.inputs import GroundingRequest, ReportRequest, RequestError, VQARequest
from m4cxr.serve.openai_chat import Sampling, with_system
from m4cxr.report_grounding import grounded_sentence, grounding_question, sentences_to_ground
from m4cxr.serve.prompts import (
    BoxAnswer, GroundingAnswer, ReportAnswer, ReportSentence, VQAAnswer, findings_list, grounding_response,
    grounding_turns, mrg_turns, report_sentence, vqa_turns,
)
from m4cxr.tasks import after_findings


def raise_error(out: Any) -> None:
    if isinstance(out, dict) and "error" in out:  # the model application's 4xx (or 503)
        raise RequestError(out["error"], out["status"])


async def model_call(call):
    """A call to the model application; a replica that died under it (its process killed, its
    node lost) is a 503 to retry, not a 500."""
    try:
        return await call
    except RayActorError as err:
        raise RequestError(f"the model replica stopped ({type(err).__name__}); retry shortly", 503) from err


class ModelClient:
    """The checkpoints, the one a request names, and calls to the model application."""

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

    def check_model(self, name: Any) -> str:
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


# ----------------------------------------------------------------------------- the routes' bodies


async def ground_report(client: ModelClient, name: str, req: ReportRequest, report: str) -> list[ReportSentence]:
    """The report's sentences, each one that states a present finding with the box the model
    gives it on the study's first image (its phrase-grounding turn, asked for all of them at once,
    so that the engine batches them)."""
    info = await client.info(name)
    image, sentences = req.images[0], sentences_to_ground(report)
    asked = [i for i, (_, findings) in enumerate(sentences) if findings]
    answers = await asyncio.gather(*(client.answer(name, grounding_question(sentences[i][0], info["system_prompt"]),
                                                   [image]) for i in asked))
    answer_of = dict(zip(asked, answers))
    return [report_sentence(grounded_sentence(text, findings, answer_of.get(i)), image, info["box_convention"])
            for i, (text, findings) in enumerate(sentences)]


async def answer_report(client: ModelClient, name: str, req: ReportRequest) -> ReportAnswer:
    """POST /mrg: the findings (the chain of thought's first turn), then the report; with
    `grounded`, its sentences with their boxes."""
    first, second, images = mrg_turns(req, (await client.info(name))["system_prompt"])
    answer = await client.answer(name, first, images)
    if req.cot:
        out = ReportAnswer(findings=findings_list(answer), findings_text=answer,
                           report=await client.answer(name, after_findings(first, answer, second), images))
    else:
        out = ReportAnswer(findings=[], findings_text="", report=answer)
    if req.grounded:
        out.sentences = await ground_report(client, name, req, out.report)
    return out


async def stream_report(client: ModelClient, name: str, req: ReportRequest):
    """POST /mrg with stream, and the page's report: ("findings", piece) while the chain of
    thought's first turn is written, then ("report", piece), then ("done", the ReportAnswer the
    unstreamed route gives, grounded once the report is written where asked). A problem with the
    prompt is raised before the first piece."""
    first, second, images = mrg_turns(req, (await client.info(name))["system_prompt"])
    pieces = await client.answer_stream(name, first, images)
    texts = {"findings": "", "report": ""}
    for part in ("findings", "report") if req.cot else ("report",):
        if part == "report" and req.cot:
            conversation = after_findings(first, texts["findings"], second)
            pieces = await client.answer_stream(name, conversation, images)
        async for item in pieces:
            if isinstance(item, str):
                texts[part] += item
                yield part, item
        texts[part] = texts[part].strip()
    out = ReportAnswer(findings=findings_list(texts["findings"]) if req.cot else [], findings_text=texts["findings"],
                       report=texts["report"])
    if req.grounded:
        out.sentences = await ground_report(client, name, req, out.report)
    yield "done", out


async def answer_grounding(client: ModelClient, name: str, req: GroundingRequest) -> GroundingAnswer | BoxAnswer:
    """POST /grounding: the box of a phrase, finding, organ or region, or what is in a box."""
    info = await client.info(name)
    answer = await client.answer(name, grounding_turns(req, info["system_prompt"]), [req.image])
    return grounding_response(req, answer, info["box_convention"])


async def answer_vqa(client: ModelClient, name: str, req: VQARequest) -> VQAAnswer:
    """POST /vqa: the answer to a question about one image or two."""
    return VQAAnswer(answer=await client.answer(name, vqa_turns(req, (await client.info(name))["system_prompt"]),
                                                req.images))


async def answer_chat(client: ModelClient, name: str, turns: list[dict], images: list, sampling: Sampling) -> list[dict]:
    """POST /v1/chat/completions: the details of the n answers to a conversation."""
    conversation = with_system(turns, (await client.info(name))["system_prompt"])
    return await client.answer_details(name, conversation, images, sampling)


async def stream_chat(client: ModelClient, name: str, turns: list[dict], images: list, sampling: Sampling):
    """POST /v1/chat/completions with stream, and the page's chat: the answer's pieces, then its
    details."""
    conversation = with_system(turns, (await client.info(name))["system_prompt"])
    return await client.answer_stream(name, conversation, images, sampling)
