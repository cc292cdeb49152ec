"""Refresh the web page's screenshots in docs/ (ui_report.png, ui_grounding.png,
ui_grounded_report.png, ui_error.png).

Serves a checkpoint with the page on 127.0.0.1 (the transformers engine, as tests/test_ui.py
does) and takes the page through the test's steps in headless Chromium (Debian's `chromium`),
a screenshot at each state. The pictures in docs/ are of the quickstart's checkpoint:

    m4cxr quickstart
    python scripts/page_screenshots.py runs/quickstart/train/quickstart-instruction/final \
        --corpus runs/quickstart/corpus

Needs the dev extras (playwright). The tests write their screenshots to a temporary folder, so
docs/ changes only when this is run.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import ray
from ray import serve

from m4cxr.config import load_experiment
from m4cxr.serve.apps import run_services

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the page's steps live with its test

from conftest import free_port  # noqa: E402
from test_ui import CHROMIUM, browse, images_with_boxed_findings  # noqa: E402

SHOTS = ("ui_report.png", "ui_grounding.png", "ui_grounded_report.png", "ui_error.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Refresh the web page's screenshots in docs/.")
    parser.add_argument("checkpoint", help="a trained checkpoint folder (the one with m4cxr.json)")
    parser.add_argument("--corpus", default=str(ROOT / "runs/quickstart/corpus"),
                        help="a synthetic corpus whose test image the grounded report is of")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the screenshots go (default: docs/)")
    args = parser.parse_args(argv)
    if CHROMIUM is None:
        parser.error("no chromium binary (apt-get install chromium)")
    checkpoint = Path(args.checkpoint).resolve()
    exp = load_experiment(checkpoint / "experiment.yaml")  # the answer length its evaluation used
    url = run_services({"default": str(checkpoint)}, port=free_port(), engine="hf",
                       max_new_tokens=exp.eval.max_new_tokens, apps=("mrg", "grounding", "ui"))
    try:
        with tempfile.TemporaryDirectory() as work:  # the DICOM and corrupt file the page is given
            browse(url, args.out, Path(work), grounded_image=images_with_boxed_findings(args.corpus, 1)[0])
    finally:
        serve.shutdown()
        ray.shutdown()
    for name in SHOTS:
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
