"""Checked requests -> conversations in the training templates, and answers -> the routes'
response models. Shared by the routes and the web page; box parsing is the evaluation's
(m4cxr/boxes.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from m4cxr.boxes import format_box, parse_box, to_pixels
from m4cxr.tasks import NOT_FOUND, cot_candidates, render_conversation, report_questions, served_task


class ReportSentence(BaseModel):  # a sentence of a grounded report (m4cxr/report_grounding.py)
    text: str
    findings: list[str]  # the present findings it states; [] for the others, which are not grounded
    box: list[int] | None  # 0-100, [x1, y1, x2, y2], on the study's first image
    box_pixels: list[float] | None
    answer: str | None  # the grounding turn's answer as written; None where it was not asked


class ReportAnswer(BaseModel):
    findings: list[str]  # the chain of thought's positive findings; [] without it
    findings_text: str  # its first answer as written
    report: str
    sentences: list[ReportSentence] | None = None  # with "grounded": true


class GroundingAnswer(BaseModel):
    box: list[int] | None  # 0-100, [x1, y1, x2, y2]; None when the answer holds no box
    box_pixels: list[float] | None
    answer: str


class BoxAnswer(BaseModel):  # what is in a given box
    answer: str


class VQAAnswer(BaseModel):
    answer: str


def question(task: str, fields: dict[str, Any], system: str) -> list[dict[str, str]]:
    """The system and user turns of a one-question task (the answer is left to the model)."""
    return render_conversation(task, {"answer": "", "bbox": "", **fields}, system)[:2]


def mrg_turns(req, system: str) -> tuple[list[dict], list[dict], list]:
    """The findings question, the report question and the images of a ReportRequest."""
    prior = list(req.prior_images or [])
    first, second = report_questions(req.scenario, len(req.images), len(prior), req.prior_report or "", system,
                                     req.cot)
    return first, second, prior + list(req.images)


def report_sentence(sentence: dict, image, convention: str) -> ReportSentence:
    """A grounded sentence (report_grounding.grounded_sentence) with its box in the image's pixels."""
    box = sentence["box"]
    pixels = [round(v, 1) for v in to_pixels(box, *image.size, convention)] if box else None
    return ReportSentence(**sentence, box_pixels=pixels)


def findings_list(answer: str) -> list[str]:
    """The CoT answer "Cardiomegaly, Edema." -> ["Cardiomegaly", "Edema"] (known names only)."""
    if answer.strip() == NOT_FOUND:
        return []
    known = {name.lower(): name for name in cot_candidates()}
    return [known[p.strip().lower()] for p in answer.rstrip(".").split(",") if p.strip().lower() in known]


def grounding_turns(req, system: str) -> list[dict]:
    """The question of a GroundingRequest: what is in its box, or where its target is."""
    if req.box is not None:
        task, key = served_task("grounding", ask=req.ask)
        return question(task, {"bbox": format_box(req.box), key: ""}, system)
    task, key = served_task("grounding", target=req.target)
    return question(task, {key: req.text}, system)


def grounding_response(req, answer: str, convention: str) -> GroundingAnswer | BoxAnswer:
    if req.box is not None:
        return BoxAnswer(answer=answer)
    box = parse_box(answer)
    if box is None:
        return GroundingAnswer(box=None, box_pixels=None, answer=answer)
    w, h = req.image.size
    return GroundingAnswer(box=list(box), box_pixels=[round(v, 1) for v in to_pixels(box, w, h, convention)],
                           answer=answer)


def vqa_turns(req, system: str) -> list[dict]:
    task, _ = served_task("vqa", images=len(req.images))
    return question(task, {"question": req.question}, system)
