"""The web page at /ui (serve/ui.py) as its users meet it: headless Chromium (Debian's `chromium`)
driven by Playwright, and gradio_client on the page's named endpoints, over the services with the
small quickstart's trained and evaluated checkpoint. What the page shows is held to what the API
routes answer for the same input. Screenshots of each state go to the test's temporary folder;
scripts/page_screenshots.py drives the page the same way to refresh the ones in docs/."""

import base64
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REAL, ROOT, free_port
from dataset_fixtures import PATIENT_NAME, PATIENT_TAG_ID, write_dicom

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IMAGE = REAL / "cc_by" / "2c35005f.jpg"  # a real PA radiograph, CC BY 3.0 (tests/data/real/SOURCES.md)
PHRASE = "There is a small left pleural effusion."


@pytest.fixture(scope="module")
def page_services(ray_local, quickstart_run):
    from ray import serve

    from m4cxr.config import load_experiment
    from m4cxr.serve.apps import run_services

    _, summary = quickstart_run
    exp = load_experiment(ROOT / "experiments/quickstart.yaml")
    # the transformers engine: it starts in seconds; the page calls the model application the same
    # way on either engine (tests/test_serve.py holds the engines to equal answers)
    url = run_services({"default": summary["train"]["checkpoint"]}, port=free_port(), engine="hf",
                       max_new_tokens=exp.eval.max_new_tokens, apps=("mrg", "grounding", "ui"))
    yield url
    serve.shutdown()


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.mark.slow
def test_gradio_client_gets_a_report_and_a_box(page_services, tmp_path):
    from gradio_client import Client, handle_file

    api_report = post(f"{page_services}/mrg", {"scenario": "single_image", "images": [b64(IMAGE)]})
    api_box = post(f"{page_services}/grounding", {"image": b64(IMAGE), "phrase": PHRASE})
    client = Client(f"{page_services}/ui/", verbose=False)
    assert {"/report", "/grounding", "/describe_box", "/vqa", "/chat", "/checkpoint_info"} <= set(
        client.view_api(print_info=False, return_format="dict")["named_endpoints"])

    chips, findings_text, report, _, picture = client.predict("default", [handle_file(str(IMAGE))], None, "", "auto",
                                                              True, False, api_name="/report")
    assert picture is None  # not asked for a grounded report
    assert report == api_report["report"] and report.strip()
    assert findings_text == api_report["findings_text"]
    assert [c["token"] for c in chips] == (api_report["findings"] or ["Not found."])

    picture, answer, box = client.predict("default", [handle_file(str(IMAGE))], "phrase", PHRASE,
                                          api_name="/grounding")
    assert box == api_box["box"] and answer == api_box["answer"]
    assert Path(picture).stat().st_size > 0

    # a bad upload: the route's own message, raised to the client
    not_an_image = tmp_path / "scan.png"
    not_an_image.write_text("not an image")
    with pytest.raises(Exception, match=r"images\[0\]: not an image"):
        client.predict("default", [handle_file(str(not_an_image))], None, "", "single_image", True, False,
                       api_name="/report")


def images_with_boxed_findings(corpus: str | Path, count: int) -> list[Path]:
    """Test-split frontal images of the synthetic world whose findings have boxes."""
    from m4cxr.data.schema import ImageStore, read_sample_table

    test = read_sample_table(corpus, "test").to_pylist()
    ids = sorted({s["images"][0]["image_id"] for s in test if s["task"] == "finding_grounding" and s["boxes"]})
    return [Path(ImageStore(corpus).path(i)) for i in ids[:count]]


@pytest.mark.slow
def test_grounded_report_boxes_each_sentence_that_states_a_finding(page_services, quickstart_run):
    """/mrg with "grounded": every sentence stating a present finding carries the model's own
    grounding answer for it (as /grounding gives it) and its box where the answer is one (the
    small quickstart's model writes findings but not yet valid boxes: those answers come back as
    written, with no box); the other sentences carry none."""
    from m4cxr.boxes import parse_box
    from m4cxr.report_grounding import report_sentences, stated_findings

    _, summary = quickstart_run
    stating = []
    for image in images_with_boxed_findings(summary["data"]["corpus"], 4):
        body = post(f"{page_services}/mrg", {"scenario": "single_image", "images": [b64(image)], "grounded": True})
        assert [s["text"] for s in body["sentences"]] == report_sentences(body["report"])
        for s in body["sentences"]:
            assert s["findings"] == stated_findings(s["text"])
            if not s["findings"]:
                assert s["box"] is None and s["box_pixels"] is None and s["answer"] is None, s
                continue
            stating.append(s)
            alone = post(f"{page_services}/grounding", {"image": b64(image), "phrase": s["text"]})
            assert (s["answer"], s["box"], s["box_pixels"]) == (alone["answer"], alone["box"], alone["box_pixels"])
            box = parse_box(s["answer"])
            assert s["box"] == (list(box) if box else None)  # no box is ever made up
    assert stating  # the trained model states findings on these images
    plain = post(f"{page_services}/mrg", {"scenario": "single_image", "images": [b64(image)]})
    assert plain["sentences"] is None and plain["report"] == body["report"]


def browse(url: str, shots: Path, work: Path, checkpoint_says: tuple[str, ...] = (),
           grounded_image: Path | None = None) -> None:
    """A user's visit to the page at {url}/ui/ in headless Chromium: a report on a real radiograph,
    a sentence of it grounded, a grounded report (on `grounded_image`, where given), a drawn box
    asked about, a DICOM and a corrupt file. What the page shows is held to what the API routes
    answer; screenshots of the report, grounding and error states go to shots
    (scripts/page_screenshots.py refreshes docs/ with them)."""
    from playwright.sync_api import expect, sync_playwright

    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(f"{url}/ui/")
        expect(page.get_by_text("A research model, not a diagnostic device")).to_be_visible(timeout=60_000)
        for text in checkpoint_says:
            expect(page.locator("#checkpoint-info")).to_contain_text(text)
        report_and_grounding(page, url, shots)
        if grounded_image is not None:
            grounded_report(page, url, shots, grounded_image)
        box_question(page)
        dicom_and_corrupt_file(page, url, shots, work)
        browser.close()


def report_and_grounding(page, url: str, shots: Path) -> None:
    from playwright.sync_api import expect

    from m4cxr.report_grounding import report_sentences

    api_report = post(f"{url}/mrg", {"scenario": "single_image", "images": [b64(IMAGE)]})
    api_box = post(f"{url}/grounding", {"image": b64(IMAGE), "phrase": report_sentences(api_report["report"])[0]})
    # report generation on a real radiograph: the findings, then the report, as the API gives them
    page.locator("#study-files input[type=file]").set_input_files(str(IMAGE))
    expect(page.locator("#gallery img").first).to_be_visible(timeout=30_000)
    page.locator("#report-button").click()
    expect(page.locator("#report-text textarea")).to_have_value(api_report["report"], timeout=120_000)
    expect(page.locator("#findings-text textarea")).to_have_value(api_report["findings_text"])
    for chip in api_report["findings"] or ["Not found."]:
        expect(page.locator("#findings-chips")).to_contain_text(chip)
    page.screenshot(path=str(shots / "ui_report.png"), full_page=True)

    # a sentence of the report, clicked: grounded, its box drawn on the image
    page.locator("#sentences label").first.click()
    expect(page.locator("#ground-answer textarea")).to_have_value(api_box["answer"], timeout=60_000)
    expect(page.locator("#boxed img")).to_be_visible()  # the image, with the model's box when it gave one
    page.screenshot(path=str(shots / "ui_grounding.png"), full_page=True)


def grounded_report(page, url: str, shots: Path, image: Path) -> None:
    """A grounded report: the report as the API's, and the picture of its boxed sentences."""
    from playwright.sync_api import expect

    api = post(f"{url}/mrg", {"scenario": "single_image", "images": [b64(image)], "grounded": True})
    page.get_by_role("tab", name="Report").click()
    page.locator("#study-files button[aria-label='Clear']").first.click()
    page.locator("#study-files input[type=file]").set_input_files(str(image))
    expect(page.locator("#gallery img").first).to_be_visible(timeout=30_000)
    page.locator("#grounded input").check()
    page.locator("#report-button").click()
    expect(page.locator("#report-text textarea")).to_have_value(api["report"], timeout=120_000)
    expect(page.locator("#grounded-report img")).to_be_visible(timeout=60_000)
    page.locator("#grounded-report").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "ui_grounded_report.png"), full_page=True)
    page.locator("#grounded input").uncheck()
    page.get_by_role("tab", name="Grounding").click()


def box_question(page) -> None:
    """The reverse question: two clicks on the image make the box asked about."""
    from playwright.sync_api import expect

    canvas = page.locator("#canvas img")
    size = canvas.bounding_box()
    canvas.click(position={"x": 0.2 * size["width"], "y": 0.3 * size["height"]})
    # the second click only after the first is taken (its corner shown), or both carry no corner
    expect(page.locator("#box-preview img")).to_be_visible(timeout=30_000)
    canvas.click(position={"x": 0.6 * size["width"], "y": 0.8 * size["height"]})
    box_text = page.locator("#box-text textarea")
    expect(box_text).not_to_have_value("", timeout=30_000)
    box = json.loads(box_text.input_value())
    assert all(abs(a - b) <= 2 for a, b in zip(box, [20, 30, 60, 80])), box
    expect(page.locator("#box-preview img")).to_be_visible()
    page.locator("#box-button").click()
    expect(page.locator("#box-answer textarea")).not_to_have_value("", timeout=60_000)


def dicom_and_corrupt_file(page, url: str, shots: Path, work: Path) -> None:
    from playwright.sync_api import expect

    dicom = write_dicom(work / "study.dcm", size=(256, 256))  # carries a patient name and id
    api_dicom = post(f"{url}/mrg", {"scenario": "single_image", "images": [b64(dicom)]})
    corrupt = work / "scan.png"
    corrupt.write_bytes((REAL / "cc_by" / "ARDSSevere.png").read_bytes()[:5000])  # a real PNG, cut short

    # a DICOM: its pixels are shown and reported on, its patient tags nowhere
    page.get_by_role("tab", name="Report").click()
    page.locator("#study-files button[aria-label='Clear']").first.click()
    page.locator("#study-files input[type=file]").set_input_files(str(dicom))
    expect(page.locator("#gallery img").first).to_be_visible(timeout=30_000)
    page.locator("#report-button").click()
    expect(page.locator("#report-text textarea")).to_have_value(api_dicom["report"], timeout=120_000)
    html = page.content()
    assert PATIENT_NAME not in html and PATIENT_TAG_ID not in html

    # a corrupt file: the API's message, shown in the page
    page.locator("#study-files button[aria-label='Clear']").first.click()
    page.locator("#study-files input[type=file]").set_input_files(str(corrupt))
    expect(page.get_by_text("study file 1: corrupt PNG data")).to_be_visible(timeout=30_000)
    page.locator("#report-button").click()
    expect(page.get_by_text("images[0]: corrupt PNG data").first).to_be_visible(timeout=30_000)
    page.screenshot(path=str(shots / "ui_error.png"), full_page=True)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium; .ci/run installs it)")
def test_page_in_a_real_browser(page_services, quickstart_run, tmp_path):
    # the checkpoint's experiment, and its evaluation's labeler
    _, summary = quickstart_run
    browse(page_services, tmp_path / "shots", tmp_path,
           checkpoint_says=("quickstart", "labeler: rule-based CheXpert-14 labeler"),
           grounded_image=images_with_boxed_findings(summary["data"]["corpus"], 1)[0])
    assert sorted(p.name for p in (tmp_path / "shots").iterdir()) == ["ui_error.png", "ui_grounded_report.png",
                                                                      "ui_grounding.png", "ui_report.png"]

    from m4cxr.ray_cluster import local_logs

    logs = local_logs()  # this test run's Ray: Serve's replica and access logs
    assert any(logs.rglob("*.log")), logs
    for path in logs.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            text = path.read_bytes()
            assert PATIENT_NAME.encode() not in text and PATIENT_TAG_ID.encode() not in text, path


@pytest.mark.slow
def test_with_api_keys_the_page_asks_for_one(page_services, quickstart_run):
    from urllib.parse import urlparse

    from gradio_client import Client

    from m4cxr.serve.apps import run_services

    _, summary = quickstart_run
    url = run_services({"default": summary["train"]["checkpoint"]}, port=urlparse(page_services).port, prefix="keyed",
                       engine="hf", max_new_tokens=8, apps=("ui",), api_keys=["page-key-1"])
    with pytest.raises(urllib.error.HTTPError) as refused:  # the page's config and API need a login
        urllib.request.urlopen(f"{url}/ui/config", timeout=60)
    assert refused.value.code == 401
    with pytest.raises(Exception):
        Client(f"{url}/ui/", auth=("reader", "wrong-key"), verbose=False)
    client = Client(f"{url}/ui/", auth=("reader", "page-key-1"), verbose=False)
    assert "quickstart" in client.predict("default", api_name="/checkpoint_info")


def test_the_models_box_is_drawn_where_it_says(tmp_path):
    """The page's grounding draws the answered box with the evaluation's overlay code, at the
    pixels the box convention gives (a model answering with a known box, on a real image)."""
    import asyncio

    import numpy as np
    from PIL import Image

    from m4cxr.serve.ui import Page

    class Answers:  # the model application's side of ModelClient, answering one fixed box
        checkpoints, default, max_new_tokens = ["default"], "default", 8

        def check_model(self, name):
            return name

        async def info(self, name):
            return {"system_prompt": "", "box_convention": "resize"}

        async def answer(self, name, conversation, images):
            return "[20, 30, 60, 80]"

    picture, answer, box = asyncio.run(Page(Answers()).grounding("default", [str(IMAGE)], "phrase", PHRASE))
    assert answer == "[20, 30, 60, 80]" and box == [20, 30, 60, 80]
    pixels = np.asarray(Image.open(picture).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)  # the dashed red box
    ys, xs = np.nonzero(red)
    assert red.sum() > 100
    # the box's corners in the picture sit in the same proportions as in the image (square image)
    width, height = xs.max() - xs.min(), ys.max() - ys.min()
    assert abs(width / height - (40 / 50)) < 0.05, (width, height)
