"""The web page at /ui, beside the APIs on the same port: a Gradio app served by Ray Serve that
answers through the routes' own handlers (serve/client.py), over the same model application.

    Report      the CoT findings as chips, then the report, streamed as they are written; the
                scenario from the inputs (several views: multi-image; a prior study with its
                report: multi-study) or picked; grounded, every sentence that states a finding
                boxed on image 1, numbered
    Grounding   a phrase, or a sentence of the report, boxed on the image (the evaluation's
                overlay drawing); two clicks on the image make a box to ask about
    VQA, chat   a question, or a free conversation, over the uploaded study

The page's inputs go through the API's own checks (serve/inputs.py), so a bad upload gets the
same message as the route's 4xx, shown in the page. DICOM files are decoded to pixels only; no
tag of theirs reaches the page or the logs. Gradio's named endpoints (report, grounding,
describe_box, vqa, chat, checkpoint_info) answer gradio_client as well. With API keys set, the
page asks for one as the password.
"""

from __future__ import annotations

import base64
import csv
import functools
import html
import inspect
import os
import tempfile
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls out from a hospital network
import gradio as gr  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from ray import serve  # noqa: E402

from m4cxr.boxes import format_box, to_pixels, to_relative  # noqa: E402
from m4cxr.eval.pictures import draw_grounded_report, draw_overlay  # noqa: E402
from m4cxr.report_grounding import report_sentences  # noqa: E402
from m4cxr.serve.access import authorized  # noqa: E402
from m4cxr.serve.client import (  # noqa: E402
    ModelClient, answer_grounding, answer_vqa, stream_chat, stream_report,
)
from m4cxr.serve.inputs import (  # noqa: E402
    GROUNDING_ASKS, GROUNDING_TARGETS, PRIOR_SCENARIO, SCENARIOS, GroundingRequest, ReportRequest, RequestError,
    VQARequest, checked, decode_image,
)
from m4cxr.serve.openai_chat import Sampling  # noqa: E402
from m4cxr.serve.prompts import findings_list  # noqa: E402
from m4cxr.tasks import IMAGE, NOT_FOUND, max_images, takes_prior_study  # noqa: E402

NOTICE = ("**A research model, not a diagnostic device.** Its findings, reports and boxes are not "
          "reviewed by a clinician and must not be used for patient care.")
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".dcm", ".dicom"]
ONE_STUDY = [s for s in SCENARIOS if not takes_prior_study(s)]  # the scenarios without a prior study


def scenario_label(scenario: str) -> str:
    """A scenario's label on the page, e.g. "Multi-image (views of one study)"."""
    name = scenario.replace("_", "-").capitalize()
    if takes_prior_study(scenario):
        return f"{name} (with a prior study)"
    return f"{name} (views of one study)" if max_images(scenario) > 1 else name


SCENARIO_CHOICES = [("From the inputs", "auto")] + [(scenario_label(s), s) for s in SCENARIOS]


def example_images() -> list[dict[str, str]]:
    """The packaged openly licensed radiographs (resources/examples), with their licences."""
    folder = resources.files("m4cxr") / "resources" / "examples"
    with (folder / "examples.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [r | {"path": str(folder / r["filename"])} for r in rows]


# ----------------------------------------------------------------------------- inputs -> checked requests


def file_b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def decode_uploads(files: list[str] | None, what: str) -> list:
    """Uploaded files -> images, with the API's checks (named by position, not by file name)."""
    return [decode_image(file_b64(f), f"{what} file {i + 1}") for i, f in enumerate(files or [])]


def pick_scenario(scenario: str, files: list, prior_files: list, prior_report: str) -> str:
    """The scenario picked, or the inputs' own: a prior study, else the smallest that takes the
    images (the largest when none does, whose check then says so)."""
    if scenario != "auto":
        return scenario
    if prior_files or prior_report.strip():
        return PRIOR_SCENARIO
    fitting = [s for s in ONE_STUDY if max_images(s) >= len(files)]
    return min(fitting, key=max_images) if fitting else max(ONE_STUDY, key=max_images)


def report_request(files: list[str] | None, prior_files: list[str] | None, prior_report: str | None,
                   scenario: str, cot: bool, grounded: bool = False) -> ReportRequest:
    """The page's report inputs as the /mrg route's checked request."""
    files, prior_files, prior_report = files or [], prior_files or [], prior_report or ""
    if not files:
        raise RequestError("upload the study's image(s) first: PNG, JPEG or DICOM")
    body: dict[str, Any] = {"scenario": pick_scenario(scenario, files, prior_files, prior_report), "cot": cot,
                            "grounded": grounded, "images": [file_b64(f) for f in files]}
    if prior_files:
        body["prior_images"] = [file_b64(f) for f in prior_files]
    if prior_report.strip():
        body["prior_report"] = prior_report
    return checked(ReportRequest, body)


def first_image_b64(files: list[str] | None) -> str:
    if not files:
        raise RequestError("upload the study's image(s) first: PNG, JPEG or DICOM")
    return file_b64(files[0])


def chips(findings: list[str], done: bool) -> list[tuple[str, str | None]]:
    """The findings as HighlightedText chips; a finished empty answer is "Not found."."""
    if not findings:
        return [(NOT_FOUND, None)] if done else []
    return [(name, "finding") for name in findings]


def chat_text(content: Any) -> str:
    """A Chatbot message's text (Gradio gives a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(chat_text(c) for c in content)
    if isinstance(content, dict):
        return str(content.get("text", content.get("content", "")))
    return str(content or "")


def info_markdown(name: str, info: dict) -> str:
    lines = [f"**Checkpoint** `{name}` at `{info['checkpoint']}`", "",
             f"**Experiment** {info['experiment']} · **engine** {info['engine']}"]
    ev = info.get("evaluation")
    if not ev:
        lines += ["", "**Evaluation** none recorded for this checkpoint (run `m4cxr eval`)."]
    else:
        numbers = ", ".join(f"{k} {v:.3f}" for k, v in ev["headline"].items() if v is not None)
        lines += ["", f"**Evaluation** on the {ev['split']} split of `{ev['corpus']}` ({ev['mode']}, "
                      f"{ev['evaluated']}); labeler: {ev['labeler']}", "", numbers]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the page


class Page:
    """The page's functions over the model application (a ModelClient: serve/client.py); each
    answer comes from the handler the API's route uses."""

    def __init__(self, client: ModelClient):
        self.client = client
        self.pictures = Path(tempfile.mkdtemp(prefix="m4cxr-ui-"))

    async def info(self, checkpoint: str) -> dict:
        return await self.client.info(self.client.check_model(checkpoint))

    async def checkpoint_info(self, checkpoint: str) -> str:
        return info_markdown(checkpoint, await self.info(checkpoint))

    def previews(self, files: list[str] | None, prior_files: list[str] | None):
        """The decoded images (DICOM too) for the gallery and the grounding canvas."""
        current, prior = decode_uploads(files, "study"), decode_uploads(prior_files, "prior study")
        gallery = [(im, f"image {i + 1}") for i, im in enumerate(current)]
        gallery += [(im, f"prior {i + 1}") for i, im in enumerate(prior)]
        return gallery, (current[0] if current else None), []

    async def report(self, checkpoint: str, files, prior_files, prior_report: str, scenario: str, cot: bool,
                     grounded: bool):
        """Findings chips, findings text, report text, the report's sentences, as written, and,
        grounded, the picture of its boxed sentences."""
        name = self.client.check_model(checkpoint)
        req = report_request(files, prior_files, prior_report, scenario, cot, grounded)
        texts = {"findings": "", "report": ""}
        async for part, item in stream_report(self.client, name, req):
            if part == "done":
                picture = self.grounded_picture(req.images[0], item.sentences) if grounded else None
                yield (chips(item.findings, True) if cot else [], item.findings_text, item.report,
                       gr.update(choices=report_sentences(item.report), value=None), picture)
                return
            texts[part] += item
            yield (chips(findings_list(texts["findings"]), False), texts["findings"], texts["report"], gr.update(),
                   gr.update())

    def grounded_picture(self, image, sentences) -> str:
        path = Path(tempfile.mkstemp(suffix=".png", dir=self.pictures)[1])
        return str(draw_grounded_report(image, [(s.text, s.box_pixels, bool(s.findings)) for s in sentences], path))

    def overlay(self, image, boxes_yellow: list, box_red, title: str) -> str:
        path = Path(tempfile.mkstemp(suffix=".png", dir=self.pictures)[1])
        return str(draw_overlay(image, boxes_yellow, box_red, title, path))

    async def grounding(self, checkpoint: str, files, target: str, text: str):
        """The boxed image, the answer and the box (0-100) for a phrase, finding, organ or region."""
        name = self.client.check_model(checkpoint)
        req = checked(GroundingRequest, {"image": first_image_b64(files), target: text or ""})
        out = await answer_grounding(self.client, name, req)
        title = f"{req.text}: {format_box(out.box)}" if out.box else f"{req.text}: no box in the answer"
        return self.overlay(req.image, [], out.box_pixels, title), out.answer, out.box

    async def click_corner(self, checkpoint: str, files, corners: list, evt: gr.SelectData):
        """Two clicks on the image: the box between them, drawn, as the 0-100 text the API takes."""
        image = decode_uploads(files, "study")[0] if files else None
        if image is None:
            raise RequestError("upload the study's image(s) first: PNG, JPEG or DICOM")
        corners = (corners or [])[-1:] + [list(evt.index)]
        if len(corners) < 2:  # shown, so that the user (and a browser test) sees the first click taken
            (x, y), = corners
            return corners, "", self.overlay(image, [], None, f"first corner at ({x}, {y}): click the opposite one")
        (xa, ya), (xb, yb) = corners
        pixels = (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))
        info = await self.info(checkpoint)
        box = to_relative(pixels, image.width, image.height, info["box_convention"])
        drawn = to_pixels(box, image.width, image.height, info["box_convention"])
        return [], format_box(box), self.overlay(image, [drawn], None, f"asking about {format_box(box)}")

    async def describe_box(self, checkpoint: str, files, box: str, ask: str) -> str:
        """What is in this box: a finding, an organ, a region or a phrase."""
        name = self.client.check_model(checkpoint)
        req = checked(GroundingRequest, {"image": first_image_b64(files), "box": box or "", "ask": ask})
        return (await answer_grounding(self.client, name, req)).answer

    async def vqa(self, checkpoint: str, files, question: str) -> str:
        name = self.client.check_model(checkpoint)
        if not files:
            raise RequestError("upload the study's image(s) first: PNG, JPEG or DICOM")
        req = checked(VQARequest, {"images": [file_b64(f) for f in files], "question": question or ""})
        return (await answer_vqa(self.client, name, req)).answer

    async def chat(self, checkpoint: str, files, message: str, history: list):
        """A free conversation over the study: its images go with the first question."""
        name = self.client.check_model(checkpoint)
        if not (message or "").strip():
            raise RequestError("type a message first")
        images = decode_uploads(files, "study")
        turns = [{"role": m["role"], "content": chat_text(m["content"])} for m in history or []]
        turns.append({"role": "user", "content": message.strip()})
        asked = [dict(turn) for turn in turns]
        if images:
            asked[0]["content"] = " ".join([IMAGE] * len(images) + [asked[0]["content"]])
        history = turns + [{"role": "assistant", "content": ""}]
        pieces = await stream_chat(self.client, name, asked, images, Sampling(self.client.max_new_tokens))
        async for item in pieces:
            if isinstance(item, str):
                history[-1]["content"] += item
                yield history, ""
        history[-1]["content"] = history[-1]["content"].strip()
        yield history, ""


def shown_errors(fn):
    """A page function whose RequestError (the API's 4xx message) is shown in the page."""
    def error(err: RequestError):
        return gr.Error(err.message, duration=None, title=f"Error {err.status}", print_exception=False)

    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def gen(*args, **kwargs):
            try:
                async for out in fn(*args, **kwargs):
                    yield out
            except RequestError as err:
                raise error(err) from None
        return gen
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def coro(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except RequestError as err:
                raise error(err) from None
        return coro

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RequestError as err:
            raise error(err) from None
    return plain


# ----------------------------------------------------------------------------- the page's layout


def study_inputs(ui: SimpleNamespace) -> None:
    """The study's uploads (and the prior study's), the examples and the gallery."""
    examples = example_images()
    with gr.Row():
        with gr.Column(scale=1):
            ui.files = gr.File(label="Study images (PNG, JPEG or DICOM; several views of one study)",
                               file_count="multiple", file_types=UPLOAD_TYPES, elem_id="study-files")
            with gr.Accordion("Prior study (multi-study)", open=False):
                ui.prior_files = gr.File(label="Prior study images", file_count="multiple",
                                         file_types=UPLOAD_TYPES, elem_id="prior-files")
                ui.prior_report = gr.Textbox(label="Prior report", lines=3, elem_id="prior-report")
            gr.Examples([[[e["path"]]] for e in examples], inputs=[ui.files],
                        label="Openly licensed example radiographs")
            gr.Markdown("Examples: " + "; ".join(
                f"{html.escape(e['finding'])} ({e['view']}), {e['license']}, [source]({e['source']})"
                for e in examples))
        with gr.Column(scale=1):
            ui.gallery = gr.Gallery(label="Uploaded images", columns=3, height=260, elem_id="gallery")


def report_tab(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.scenario = gr.Radio(SCENARIO_CHOICES, value="auto", label="Scenario")
        ui.cot = gr.Checkbox(value=True, label="Findings first (chain of thought)")
        ui.grounded = gr.Checkbox(value=False, label="Box each finding sentence (grounded report)",
                                  elem_id="grounded")
    ui.report_button = gr.Button("Generate report", variant="primary", elem_id="report-button")
    ui.findings_chips = gr.HighlightedText(label="Findings", show_legend=False, combine_adjacent=False,
                                           elem_id="findings-chips")
    ui.findings_text = gr.Textbox(label="Findings (the model's first answer)", elem_id="findings-text")
    ui.report_text = gr.Textbox(label="Report", lines=6, elem_id="report-text")
    ui.sentences = gr.Radio([], label="Ground a sentence of the report (click one)", elem_id="sentences")
    ui.grounded_report = gr.Image(label="Grounded report: each finding sentence's box on image 1", type="filepath",
                                  elem_id="grounded-report")


def grounding_tab(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.target = gr.Dropdown(list(GROUNDING_TARGETS), value="phrase", label="Ground a")
        ui.target_text = gr.Textbox(label="Text to ground", scale=3, elem_id="ground-text")
    ui.ground_button = gr.Button("Find it on the image", variant="primary", elem_id="ground-button")
    with gr.Row():
        ui.boxed = gr.Image(label="Model's box (red dashed) on image 1", type="filepath", elem_id="boxed")
        with gr.Column():
            ui.ground_answer = gr.Textbox(label="Answer", elem_id="ground-answer")
            ui.ground_box = gr.JSON(label="Box (0-100, x1 y1 x2 y2)")
    gr.Markdown("**What is here?** Click two corners on the image below, then ask.")
    with gr.Row():
        ui.canvas = gr.Image(label="Image 1 (click two corners)", type="pil", interactive=False, elem_id="canvas")
        with gr.Column():
            ui.box_preview = gr.Image(label="The box asked about", type="filepath", elem_id="box-preview")
            ui.box_text = gr.Textbox(label="Box (0-100)", placeholder="[x1, y1, x2, y2]", elem_id="box-text")
            ui.ask = gr.Dropdown(list(GROUNDING_ASKS), value=GROUNDING_ASKS[0], label="Ask for a")
            ui.box_button = gr.Button("Describe the box", elem_id="box-button")
            ui.box_answer = gr.Textbox(label="Answer", elem_id="box-answer")


def chat_tab(ui: SimpleNamespace) -> None:
    with gr.Row():
        ui.question = gr.Textbox(label="Question about the study", scale=3, elem_id="vqa-question")
        ui.vqa_button = gr.Button("Ask", elem_id="vqa-button")
    ui.vqa_answer = gr.Textbox(label="Answer", elem_id="vqa-answer")
    ui.chatbot = gr.Chatbot(label="Chat over the study", height=300, elem_id="chatbot")
    ui.message = gr.Textbox(label="Message", placeholder="Ask anything about the images", elem_id="chat-message")


def sentence_to_phrase(sentence):
    """A clicked sentence of the report is grounded as a phrase, on the grounding tab."""
    return "phrase", sentence or "", gr.Tabs(selected="grounding-tab")


def wire(page: Page, ui: SimpleNamespace, demo: gr.Blocks) -> None:
    """The page's events; the named ones (api_name) answer gradio_client too."""
    run, private = shown_errors, {"api_visibility": "private"}
    demo.load(run(page.checkpoint_info), [ui.checkpoint], [ui.info], api_name="checkpoint_info")
    ui.checkpoint.change(run(page.checkpoint_info), [ui.checkpoint], [ui.info], **private)
    previews = [ui.gallery, ui.canvas, ui.corners]
    ui.files.change(run(page.previews), [ui.files, ui.prior_files], previews, **private)
    ui.prior_files.change(run(page.previews), [ui.files, ui.prior_files], previews, **private)
    ui.report_button.click(run(page.report), [ui.checkpoint, ui.files, ui.prior_files, ui.prior_report, ui.scenario,
                                              ui.cot, ui.grounded],
                           [ui.findings_chips, ui.findings_text, ui.report_text, ui.sentences, ui.grounded_report],
                           api_name="report")
    ground_inputs = [ui.checkpoint, ui.files, ui.target, ui.target_text]
    ground_outputs = [ui.boxed, ui.ground_answer, ui.ground_box]
    ui.ground_button.click(run(page.grounding), ground_inputs, ground_outputs, api_name="grounding")
    ui.target_text.submit(run(page.grounding), ground_inputs, ground_outputs, **private)
    ui.sentences.input(sentence_to_phrase, [ui.sentences], [ui.target, ui.target_text, ui.tabs], **private).then(
        run(page.grounding), ground_inputs, ground_outputs, **private)
    ui.canvas.select(run(page.click_corner), [ui.checkpoint, ui.files, ui.corners],
                     [ui.corners, ui.box_text, ui.box_preview], **private)
    ui.box_button.click(run(page.describe_box), [ui.checkpoint, ui.files, ui.box_text, ui.ask], [ui.box_answer],
                        api_name="describe_box")
    vqa_inputs = [ui.checkpoint, ui.files, ui.question]
    ui.vqa_button.click(run(page.vqa), vqa_inputs, [ui.vqa_answer], api_name="vqa")
    ui.question.submit(run(page.vqa), vqa_inputs, [ui.vqa_answer], **private)
    ui.message.submit(run(page.chat), [ui.checkpoint, ui.files, ui.message, ui.chatbot], [ui.chatbot, ui.message],
                      api_name="chat")


def build_page(page: Page) -> gr.Blocks:
    """The Gradio Blocks of the page."""
    client, ui = page.client, SimpleNamespace()
    with gr.Blocks(title="M4CXR", analytics_enabled=False) as demo:
        gr.Markdown("# M4CXR: chest X-ray report generation, grounding and VQA")
        gr.Markdown(NOTICE, elem_id="notice")
        with gr.Row():
            ui.checkpoint = gr.Dropdown(client.checkpoints, value=client.default, label="Checkpoint", scale=1)
            ui.info = gr.Markdown(elem_id="checkpoint-info")
        study_inputs(ui)
        ui.corners = gr.State([])
        with gr.Tabs() as ui.tabs:
            with gr.Tab("Report", id="report-tab"):
                report_tab(ui)
            with gr.Tab("Grounding", id="grounding-tab"):
                grounding_tab(ui)
            with gr.Tab("VQA and chat", id="chat-tab"):
                chat_tab(ui)
        wire(page, ui, demo)
    return demo


@serve.deployment(max_ongoing_requests=64, max_queued_requests=256)
@serve.ingress()
class UIService:
    """The page as a Serve deployment: the Gradio app is built in the replica (a Blocks object does
    not pickle), over a ModelClient of the model application."""

    def __init__(self, checkpoints: list[str], default: str = "default", max_new_tokens: int = 256,
                 api_key_hashes: list[str] | None = None, model_app: str = "model"):
        self.client = ModelClient(checkpoints, default, max_new_tokens, api_key_hashes, model_app)

    def __serve_build_asgi_app__(self):
        hashes = self.client.api_key_hashes
        auth = (lambda _user, key: authorized(f"Bearer {key}", hashes)) if hashes else None
        demo = build_page(Page(self.client)).queue(default_concurrency_limit=16)
        theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # no web fonts
        return gr.mount_gradio_app(FastAPI(), demo, path="/", auth=auth,
                                   auth_message="Log in with any user name and one of the service's API keys.",
                                   max_file_size="64mb", footer_links=["api"], theme=theme,
                                   css=".finding-chip{margin:2px}")
