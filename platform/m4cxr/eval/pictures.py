"""Pictures of an evaluation run: grounding overlays and the report page.

Overlays follow the paper's Figure 6: the reference box in a yellow solid line, the model's box
in a red dashed line, drawn on the image the model saw, with the phrase and the IoU above it.
The report page (report.md) holds the tables, the overlays and a few generated reports beside
their references.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.patches as patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402

from m4cxr.boxes import parse_box, to_pixels  # noqa: E402
from m4cxr.data.schema import ImageStore, read_sample_table  # noqa: E402
from m4cxr.tasks import headline_task  # noqa: E402


def draw_overlay(image, reference_boxes: list, predicted_box, title: str, path: str | Path) -> Path:
    """One X-ray with the reference box(es) yellow solid and the prediction red dashed (pixels)."""
    fig, ax = plt.subplots(figsize=(4, 4.4), dpi=100)
    ax.imshow(image, cmap="gray")
    for x1, y1, x2, y2 in reference_boxes:
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="yellow", linewidth=2))
    if predicted_box is not None:
        x1, y1, x2, y2 = predicted_box
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", linewidth=2,
                                       linestyle="--"))
    ax.set_title("\n".join(textwrap.wrap(title, 48)[:3]), fontsize=8)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


BOX_COLOURS = ["red", "deepskyblue", "lime", "orange", "magenta", "yellow", "cyan", "white"]


def draw_grounded_report(image, sentences: list[tuple[str, list[float] | None, bool]], path: str | Path) -> Path:
    """A grounded report on its image: each boxed sentence's box (pixels) numbered in its own
    colour, and the sentences below, numbered alike; a sentence stating a finding whose answer
    held no box says so, the others are listed as they are."""
    fig, ax = plt.subplots(figsize=(5, 6.2), dpi=100)
    ax.imshow(image, cmap="gray")
    lines, number = [], 0
    for text, box, states_finding in sentences:
        if box is None:
            lines.append(f"{text} (no box in the model's answer)" if states_finding else text)
            continue
        number += 1
        colour = BOX_COLOURS[(number - 1) % len(BOX_COLOURS)]
        x1, y1, x2, y2 = box
        ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2))
        ax.text(x1 + 2, y1 + 2, str(number), color=colour, fontsize=11, fontweight="bold", va="top")
        lines.append(f"[{number}] {text}")
    ax.axis("off")
    wrapped = [w for line in lines for w in textwrap.wrap(line, 70)]
    fig.text(0.02, 0.01, "\n".join(wrapped[:14]), fontsize=7, va="bottom", family="sans-serif")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.98, bottom=0.02 + 0.022 * min(len(wrapped), 14))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def grounding_overlays(predictions: pa.Table, results: dict, corpus_dir: str | Path, out_dir: str | Path,
                       count: int, convention: str, task: str | None = None) -> list[Path]:
    """Overlays for the first `count` grounding predictions of `task` (the headline grounding task
    by default: phrase grounding)."""
    task = task or headline_task("box")
    rows = [r for r in predictions.to_pylist() if r["task"] == task and not r["error"]][:count]
    if not rows:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = {r["sample_id"]: r for r in read_sample_table(corpus_dir, results.get("split", "test")).to_pylist()}
    store = ImageStore(corpus_dir)
    ious = dict(zip([r["sample_id"] for r in predictions.to_pylist() if r["task"] == task and not r["error"]],
                    results["grounding"].get(task, {}).get("iou", [])))
    paths = []
    for r in rows:
        s = samples[r["sample_id"]]
        image_id = s["images"][0]["image_id"]
        w, h = store.size(image_id)
        box = parse_box(r["prediction"])
        refs = [b["box"] for b in s["boxes"] if b["image_index"] == 0]
        phrase = s["turns"][1]["content"].split("describes:")[-1].strip()
        title = f"{phrase} (IoU {ious.get(r['sample_id'], 0.0):.2f})"
        with store.load(image_id) as im:
            paths.append(draw_overlay(im.convert("L"), refs, to_pixels(box, w, h, convention) if box else None, title,
                                      out_dir / f"{r['sample_id']}.png"))
    return paths


def write_report_page(out_dir: str | Path, tables_md: str, overlays: list[Path], predictions: pa.Table,
                      examples: int = 4) -> Path:
    """report.md: the tables, the overlays, and a few generated reports with their references."""
    out_dir = Path(out_dir)
    lines = [tables_md, "## Grounding overlays", "",
             "Reference box yellow solid, prediction red dashed (as in the paper's Figure 6).", ""]
    lines += [f"![{p.stem}]({p.relative_to(out_dir)})" for p in overlays] or ["(no grounding samples)"]
    lines += ["", "## Generated reports", ""]
    shown = [r for r in predictions.to_pylist() if r["task_type"] == "mrg" and not r["error"]][:examples]
    for r in shown:
        lines += [f"**{r['sample_id']}** ({r['task']}, {r['mode']})", ""]
        if r["findings"]:
            lines += [f"- findings: {r['findings']}"]
        lines += [f"- generated: {r['prediction']}", f"- reference: {r['reference']}", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
