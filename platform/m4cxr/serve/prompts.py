"""Checked requests -> conversations in the training templates, and answers -> response bodies.
Shared by the services and the chat route; box parsing is the evaluation's (m4cxr/boxes.py)."""

from __future__ import annotations

from typing import Any

from m4cxr.boxes import format_box, parse_box, to_pixels
from m4cxr.tasks import NOT_FOUND, cot_candidates, render_conversation, report_questions, served_task


def question(task: str, fields: dict[str, Any], system: str) -> list[dict[str, str]]:
    """The system and user turns of a one-question task (the answer is left to the model)."""
    return render_conversation(task, {"answer": "", "bbox": "", **fields}, system)[:2]


def mrg_turns(req: dict[str, Any], system: str) -> tuple[list[dict], list[dict], list]:
    """The findings question, the report question and the images of a report request."""
    first, second = report_questions(req["scenario"], len(req["images"]), len(req.get("prior_images", [])),
                                     req.get("prior_report", ""), system, req["cot"])
    return first, second, list(req.get("prior_images", [])) + list(req["images"])


def findings_list(answer: str) -> list[str]:
    """The CoT answer "Cardiomegaly, Edema." -> ["Cardiomegaly", "Edema"] (known names only)."""
    if answer.strip() == NOT_FOUND:
        return []
    known = {name.lower(): name for name in cot_candidates()}
    return [known[p.strip().lower()] for p in answer.rstrip(".").split(",") if p.strip().lower() in known]


def grounding_turns(req: dict[str, Any], system: str) -> list[dict]:
    if "box" in req:
        task, key = served_task("grounding", ask=req["ask"])
        return question(task, {"bbox": format_box(req["box"]), key: ""}, system)
    task, key = served_task("grounding", target=req["target"])
    return question(task, {key: req["text"]}, system)


def grounding_response(req: dict[str, Any], answer: str, convention: str) -> dict[str, Any]:
    if "box" in req:
        return {"answer": answer}
    box = parse_box(answer)
    if box is None:
        return {"box": None, "box_pixels": None, "answer": answer}
    w, h = req["image"].size
    return {"box": list(box), "box_pixels": [round(v, 1) for v in to_pixels(box, w, h, convention)], "answer": answer}


def vqa_turns(req: dict[str, Any], system: str) -> list[dict]:
    task, _ = served_task("vqa", images=len(req["images"]))
    return question(task, {"question": req["question"]}, system)
