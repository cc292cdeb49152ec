"""Checked requests -> conversations in the training templates, and answers -> response bodies.
Shared by the services and the chat route; box parsing is the evaluation's (data/boxes.py)."""

from __future__ import annotations

from typing import Any

from m4cxr.data.boxes import format_box, parse_box, to_pixels
from m4cxr.data.templates import NOT_FOUND, cot_candidates, render_conversation

GROUNDING_TASKS = {"phrase": ("phrase_grounding", "phrase"), "finding": ("finding_grounding", "finding"),
                   "organ": ("organ_grounding", "organ"), "region": ("anatomical_region_grounding", "name")}
REVERSE_TASKS = {"finding": ("grounded_finding", "finding"), "organ": ("grounded_organ", "organ"),
                 "region": ("grounded_anatomical_region", "name"), "phrase": ("grounded_phrase_generation", "phrase")}


def question(task: str, fields: dict[str, Any], system: str) -> list[dict[str, str]]:
    """The system and user turns of a one-question task (the answer is left to the model)."""
    return render_conversation(task, {"answer": "", "bbox": "", **fields}, system)[:2]


def mrg_turns(req: dict[str, Any], system: str) -> tuple[list[dict], list[dict], list]:
    """The findings question, the report question and the images of a report request."""
    scenario = req["scenario"]
    fields = {"images": len(req["images"]), "findings": cot_candidates(), "positives": [], "report": "",
              "prior_images": len(req.get("prior_images", [])), "prior_report": req.get("prior_report", ""),
              "follow_up_images": len(req["images"])}
    conv = render_conversation(scenario, fields, system, cot=req["cot"])
    images = list(req.get("prior_images", [])) + list(req["images"])
    return conv[:2], (conv[3:4] if req["cot"] else []), images


def findings_list(answer: str) -> list[str]:
    """The CoT answer "Cardiomegaly, Edema." -> ["Cardiomegaly", "Edema"] (known names only)."""
    if answer.strip() == NOT_FOUND:
        return []
    known = {name.lower(): name for name in cot_candidates()}
    return [known[p.strip().lower()] for p in answer.rstrip(".").split(",") if p.strip().lower() in known]


def grounding_turns(req: dict[str, Any], system: str) -> list[dict]:
    if "box" in req:
        task, key = REVERSE_TASKS[req["ask"]]
        return question(task, {"bbox": format_box(req["box"]), key: ""}, system)
    task, key = GROUNDING_TASKS[req["target"]]
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
    task = "vqa" if len(req["images"]) == 1 else "difference_vqa"
    return question(task, {"question": req["question"]}, system)
