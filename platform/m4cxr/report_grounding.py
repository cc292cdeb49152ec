"""Grounded reports: each sentence of a generated report that states a present finding, boxed by
the model's own phrase-grounding turn. The /mrg route, the web page and the evaluation share it.

A sentence states a present finding when the report labeler (labeler/rules.py) finds one of the
CheXpert observations positive in it ("No Finding" aside): "There is a small left pleural
effusion." is boxed; "No pneumothorax.", "The lungs are clear." and a hedged "Possible small
effusion." are not. A grounding answer that holds no box is kept as written, with no box.
"""

from __future__ import annotations

import re
from typing import Any

from m4cxr.boxes import parse_box
from m4cxr.labeler.rules import label_report
from m4cxr.tasks import render_conversation, served_task

PHRASE_TASK, PHRASE_FIELD = served_task("grounding", target="phrase")


def report_sentences(report: str) -> list[str]:
    """The report's sentences as written (one-character leftovers dropped)."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", report or "") if len(s.strip()) > 1]


def stated_findings(sentence: str) -> list[str]:
    """The observations a sentence states as present, in the labeler's order."""
    return [obs for obs, value in label_report(sentence).items() if value == 1 and obs != "No Finding"]


def grounding_question(sentence: str, system: str) -> list[dict[str, str]]:
    """The system and user turns that ask the model for the box of a sentence (phrase grounding)."""
    return render_conversation(PHRASE_TASK, {PHRASE_FIELD: sentence, "bbox": "", "answer": ""}, system)[:2]


def sentences_to_ground(report: str) -> list[tuple[str, list[str]]]:
    """(sentence, the findings it states) for every sentence of the report."""
    return [(s, stated_findings(s)) for s in report_sentences(report)]


def grounded_sentence(text: str, findings: list[str], answer: str | None) -> dict[str, Any]:
    """A sentence with its box (0-100, x1 y1 x2 y2): None where it states no present finding
    (answer None: not asked) or where the model's answer holds no box (answer kept)."""
    box = parse_box(answer) if answer is not None else None
    return {"text": text, "findings": findings, "box": list(box) if box else None, "answer": answer}
