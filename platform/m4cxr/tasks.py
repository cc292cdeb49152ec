"""The 17 tasks: what each is, how it is asked, scored and served, from resources/tasks.yaml.

The one place the code asks about a task. resources/tasks.yaml holds each task's templates (the
paper's Table 8 in the wording and answer forms of the authors' training code), its type, how it
is scored, which route serves it; the functions below read it. Adding a task is an entry there
(and a dataset adapter that writes its samples); see the README's "How to add a task".

A conversation is a list of {"role": "system"|"user"|"assistant", "content": str}; each image
appears as one "<image>" placeholder in a user turn, in the order of the sample's images.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from typing import Any, Sequence

import yaml

from m4cxr.boxes import format_box, format_boxes

IMAGE = "<image>"
NOT_FOUND = "Not found."
PLACEHOLDER = re.compile(r"\{(\w+)\}")
IMAGE_FIELDS = ("images", "prior_images", "follow_up_images")


@lru_cache(maxsize=1)
def task_spec() -> dict[str, Any]:
    """resources/tasks.yaml: the system message, the tasks (types, turns, scoring, serving) and
    the CheXbert label lists."""
    text = resources.files("m4cxr").joinpath("resources/tasks.yaml").read_text()
    return yaml.safe_load(text)


DEFAULT_SYSTEM_PROMPT: str = task_spec()["system_prompt"]


def task_names() -> list[str]:
    return list(task_spec()["tasks"])


def task_type(task: str) -> str:
    """mrg | image_understanding | vqa: the paper's three task types (the mixture's groups)."""
    return _task(task)["type"]


def report_scenarios() -> list[str]:
    """The report-generation tasks: single_image, multi_image, multi_study."""
    return [name for name, t in task_spec()["tasks"].items() if t["type"] == "mrg"]


def pretrain_tasks() -> list[str]:
    """The tasks of stage 1 (vision-language alignment on image-report pairs)."""
    return [name for name, t in task_spec()["tasks"].items() if t.get("pretrain")]


def scored_as(task: str) -> str | None:
    """report | box | answer, or None for a task that is trained but not scored."""
    return _task(task).get("scored_as")


RESULT_GROUPS = {"report": "mrg", "box": "grounding", "answer": "vqa"}  # the results' sections


def result_group(task: str) -> str | None:
    """The section of the evaluation results a task's scores go to: mrg | grounding | vqa."""
    return RESULT_GROUPS.get(scored_as(task))


def headline_task(kind: str) -> str:
    """The task the summaries report for a kind of scoring (report, box, answer)."""
    return next(name for name, t in task_spec()["tasks"].items()
                if t.get("scored_as") == kind and t.get("headline"))


def max_images(scenario: str) -> int:
    return int(_task(scenario)["max_images"])


def takes_prior_study(scenario: str) -> bool:
    return bool(_task(scenario).get("prior_study"))


def served_task(route: str, **key: Any) -> tuple[str, str]:
    """(task, the template field the request's text goes into) of the task a route asks, e.g.
    served_task("grounding", target="phrase") -> ("phrase_grounding", "phrase")."""
    for name, t in task_spec()["tasks"].items():
        serve = t.get("serve", {})
        if serve.get("route") == route and all(serve.get(k) == v for k, v in key.items()):
            return name, serve.get("field", "")
    raise KeyError(f"no task serves {route} with {key}")


def served_choices(route: str, key: str) -> list[str]:
    """The values a route's selector takes, e.g. served_choices("grounding", "target")."""
    return [t["serve"][key] for t in task_spec()["tasks"].values()
            if t.get("serve", {}).get("route") == route and key in t["serve"]]


def chexbert_labels() -> list[str]:
    """The 14 CheXpert observations in CheXbert's head order, "No Finding" last."""
    return list(task_spec()["chexbert_labels_14"])


def chexpert_5() -> list[str]:
    """The five observations of the mF1-5 / MF1-5 scores."""
    return list(task_spec()["chexbert_labels_5"])


def cot_candidates() -> list[str]:
    """Turn 1 of report generation lists the 13 observations without "No Finding"."""
    return [name for name in chexbert_labels() if name != "No Finding"]


def _task(task: str) -> dict[str, Any]:
    tasks = task_spec()["tasks"]
    if task not in tasks:
        raise KeyError(f"unknown task {task!r}; the tasks are: {', '.join(tasks)}")
    return tasks[task]


# ----------------------------------------------------------------------------- answer texts


def findings_answer(positives: Sequence[str], candidates: Sequence[str] | None = None) -> str:
    """The chain-of-thought answer, as the authors write it: positive findings lower-case, in
    candidate-list order, ending with a period; "Not found." when nothing is positive."""
    if candidates is not None:
        unknown = [p for p in positives if p not in candidates]
        if unknown:
            raise ValueError(f"findings {unknown} are not among the candidates {list(candidates)}")
        positives = [c for c in candidates if c in set(positives)]
    return names_list(positives) + "." if positives else NOT_FOUND


def names_list(names: Sequence[str]) -> str:
    """Finding names as the authors' prompts and answers write them: lower-case, ", "-joined."""
    return ", ".join(name.lower() for name in names)


def positive_findings(labels: dict[str, int], candidates: Sequence[str]) -> list[str]:
    """CheXbert-style labels (1 positive, 0 negative, -1 uncertain) -> positives in list order.
    Uncertain counts as absent, as in the authors' training data."""
    return [name for name in candidates if labels.get(name) == 1]


def findings_with_boxes(items: Sequence[tuple[str, Sequence[Sequence[int]]]]) -> str:
    """[("Cardiomegaly", [box]), ("Nodule", [box, box])] -> "cardiomegaly [..], nodule [..], [..]" """
    return ", ".join(f"{name.lower()} {format_boxes(boxes)}" for name, boxes in items)


# ----------------------------------------------------------------------------- rendering

ANSWER_LISTS = ("findings", "bbox", "findings_with_bboxes")  # empty -> the task's negative answer


def _empty(value: Any) -> bool:
    return value is None or (not isinstance(value, (int, float)) and len(value) == 0)


def _value(key: str, v: Any, role: str, task: str) -> str:
    if key in IMAGE_FIELDS:
        count = v if isinstance(v, int) else len(v)
        if count < 1:
            raise ValueError(f"task {task!r}: '{key}' needs at least one image")
        return " ".join([IMAGE] * count)
    if key in ("finding", "organ"):
        return str(v).lower()  # as the authors write names
    if key == "phrase" and role == "assistant":
        return str(v).rstrip(".")  # the template adds the period
    if isinstance(v, str):
        return v
    if key == "findings":
        return names_list(v)
    if key == "bbox":
        return format_box(v) if v and isinstance(v[0], (int, float)) else format_boxes(v)
    if key == "findings_with_bboxes":
        return findings_with_boxes(v)
    return str(v)


def _fill(text: str, fields: dict[str, Any], role: str, task: str) -> str:
    def value(match: re.Match) -> str:
        key = match.group(1)
        if key not in fields:
            raise KeyError(f"task {task!r}: the template needs {{{key}}} but the sample has no '{key}'")
        return _value(key, fields[key], role, task)

    return PLACEHOLDER.sub(value, text)


def render_conversation(
    task: str,
    fields: dict[str, Any],
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    cot: bool = True,
    follow_ups: Sequence[tuple[str, str]] = (),
) -> list[dict[str, str]]:
    """Render one sample of `task` from its fields into system + user/assistant turns.

    Fields by placeholder: images / prior_images / follow_up_images (a count or a list),
    findings (the candidate list; the assistant's answer comes from `positives`), report,
    prior_report, finding, organ, phrase, name, question, answer, bbox (one box in a question;
    one box or a list of boxes as an answer), findings_with_bboxes. `cot=False` renders report
    generation as one turn (the paper's no-CoT variant). `follow_ups` appends further
    (question, answer) turns, as in multi-turn instruction following.
    """
    spec = _task(task)
    turns = [{"role": "system", "content": system_prompt}]
    template = spec["turns"]
    if spec["type"] == "mrg" and not cot:
        template = [{"user": spec["single_turn"]}, {"assistant": "{report}"}]
    answer_fields = dict(fields)
    if "positives" in fields:
        answer_fields["findings"] = [c for c in fields.get("findings", fields["positives"]) if c in set(fields["positives"])]
    for turn in template:
        (role, text), = turn.items()
        if role == "assistant" and any(_empty(answer_fields.get(k, "-")) for k in PLACEHOLDER.findall(text)
                                       if k in ANSWER_LISTS):
            content = spec.get("negative", NOT_FOUND)
        else:
            content = _fill(text, fields if role == "user" else answer_fields, role, task)
        turns.append({"role": role, "content": content})
    for question, answer in follow_ups:
        turns.append({"role": "user", "content": question})
        turns.append({"role": "assistant", "content": answer})
    return turns


def count_images(turns: Sequence[dict[str, str]]) -> int:
    return sum(t["content"].count(IMAGE) for t in turns if t["role"] == "user")


# ----------------------------------------------------------------------------- the CoT exchange


def report_questions(scenario: str, images: int, prior_images: int = 0, prior_report: str = "",
                     system: str = DEFAULT_SYSTEM_PROMPT, cot: bool = True) -> tuple[list[dict], list[dict]]:
    """A report request as the model is asked it: the first question (system and user turns)
    and, with cot, the report question that follows the model's findings answer."""
    fields = {"images": images, "findings": cot_candidates(), "positives": [], "report": "",
              "prior_images": prior_images, "prior_report": prior_report, "follow_up_images": images}
    conv = render_conversation(scenario, fields, system, cot=cot)
    return conv[:2], (conv[3:4] if cot else [])


def after_findings(first: Sequence[dict], findings: str, report_question: Sequence[dict]) -> list[dict]:
    """The second turn of chain-of-thought report generation: the first question, the model's
    own findings answer kept as the assistant's turn, then the report question."""
    return [*first, {"role": "assistant", "content": findings}, *report_question]


def single_turn_report_conversation(sample: dict[str, Any]) -> list[dict[str, str]]:
    """A stored report-generation sample (a row of SAMPLE_SCHEMA) as one question and the report,
    without the findings turn: the no-CoT variant for training (mrg_format) and evaluation."""
    roles = [i["role"] for i in sample["images"]]
    fields = {"images": roles.count("current"), "follow_up_images": roles.count("current"),
              "prior_images": roles.count("prior"), "prior_report": sample["prior_report"] or "",
              "report": sample["report"] or "", "findings": [], "positives": []}
    return render_conversation(sample["task"], fields, sample["turns"][0]["content"], cot=False)
