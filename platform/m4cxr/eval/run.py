"""Driver side of evaluation: a checkpoint and a test split -> predictions, metrics, tables, pictures.

    OUT/predictions.parquet   one row per (sample, mode): the model's answers beside the references
    OUT/metrics.json          every metric by task and mode, intervals, baselines, notes
    OUT/tables.md             the paper's Tables 1-5 and 7 in shape
    OUT/overlays/*.png        grounding pictures (reference yellow solid, prediction red dashed)
    OUT/report.md             the page to read: tables, pictures, example reports
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from m4cxr.config import Experiment
from m4cxr.eval.inference import run_inference
from m4cxr.eval.pictures import grounding_overlays, write_report_page
from m4cxr.eval.scoring import score_predictions
from m4cxr.eval.tables import headline, render_tables
from m4cxr.tasks import headline_task
from m4cxr.tracking import RunLog, flat_metrics

log = logging.getLogger(__name__)


def evaluate(exp: Experiment, checkpoint: str | Path, out: str | Path, corpus_dir: str | Path | None = None) -> dict:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus_dir = str(Path(corpus_dir or exp.data.corpus_dir).resolve())
    if not (Path(checkpoint) / "m4cxr.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: not an M4CXR checkpoint (no m4cxr.json); pass a run's final/ folder")
    started = time.time()
    log.info("eval: inference on the %s split of %s (tasks %s)", exp.eval.split, corpus_dir, ", ".join(exp.eval.tasks))
    predictions = run_inference(exp, checkpoint, corpus_dir, out / "predictions.parquet")
    inference_s = time.time() - started
    log.info("eval: %d answers in %.0fs; scoring", predictions.num_rows, inference_s)
    results = score_predictions(exp, predictions, corpus_dir)
    results.update(checkpoint=str(Path(checkpoint).resolve()), split=exp.eval.split, corpus=corpus_dir,
                   engine=predictions.schema.metadata[b"engine"].decode(), inference_seconds=round(inference_s, 1))
    tables = render_tables(results, exp)
    (out / "tables.md").write_text(tables)
    overlays = grounding_overlays(predictions, results, corpus_dir, out / "overlays", exp.eval.overlays,
                                  exp.data.box_convention)
    page = write_report_page(out, tables, overlays, predictions)
    results["seconds"] = round(time.time() - started, 1)
    results["files"] = {"predictions": str(out / "predictions.parquet"), "tables": str(out / "tables.md"),
                        "report": str(page), "overlays": [str(p) for p in overlays]}
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    write_evaluation_card(checkpoint, results, exp, out)
    track(exp, results, out, checkpoint)
    log.info("%s", tables)
    log.info("eval: done in %.0fs -> %s", results["seconds"], page)
    return results


def write_evaluation_card(checkpoint: str | Path, results: dict, exp: Experiment, out: Path) -> None:
    """evaluation.json in the checkpoint folder: what a served checkpoint shows of its latest
    evaluation (the web page): the split, the labeler and the headline numbers."""
    card = {"experiment": exp.name, "split": results["split"], "corpus": results["corpus"],
            "labeler": results["labeler"], "mode": "cot" if exp.eval.cot else "no_cot",
            "headline": headline(results, exp), "metrics": str(out / "metrics.json"),
            "evaluated": time.strftime("%Y-%m-%d %H:%M", time.localtime())}
    try:
        (Path(checkpoint) / "evaluation.json").write_text(json.dumps(card, indent=2))
    except OSError as err:  # a read-only checkpoint store: the evaluation itself stands
        log.warning("eval: could not write %s (%s)", Path(checkpoint) / "evaluation.json", err)


def eval_summary(results: dict, exp: Experiment) -> dict:
    """The quickstart's `eval` section: headline numbers of each task type beside their baselines."""
    mode = "cot" if exp.eval.cot else "no_cot"
    h = headline(results, exp)
    agreement = results.get("labeler_agreement")
    summary: dict = {"mode": mode, "labeler": results["labeler"],
                     "labeler_micro_f1_vs_experts": agreement["micro_f1"] if agreement else None}
    report, box, answer = headline_task("report"), headline_task("box"), headline_task("answer")
    if report in results["mrg"]:
        summary["mrg"] = {k: h[k] for k in ("mF1-14", "MF1-14", "BLEU-4", "ROUGE-L")}
        summary["mrg"]["baseline_mF1-14"] = results["baselines"][report]["mF1-14"]
    if box in results["grounding"]:
        g = results["grounding"][box]
        summary["grounding"] = {"mIoU": g["mIoU"], "acc@0.5": g["acc@0.5"],
                                "baseline_mIoU": results["baselines"][box]["mIoU"]}
    grounded = results.get("grounded_reports", {}).get(report)
    if grounded:
        summary["grounded_report"] = {k: grounded[k] for k in ("mIoU", "acc@0.5", "box_rate", "finding_coverage",
                                                               "sentences")}
    if answer in results["vqa"]:
        summary["vqa"] = {"accuracy": results["vqa"][answer]["accuracy"],
                          "baseline_accuracy": results["baselines"][answer]["accuracy"]}
    rates = {task: by_mode[mode]["hallucinated_comparison_rate"] for task, by_mode in results["mrg"].items()
             if mode in by_mode}
    summary["hallucinated_comparison_rate"] = rates.get(report)
    summary["comparison_rate_by_scenario"] = rates
    return summary


def track(exp: Experiment, results: dict, out: Path, checkpoint: str | Path) -> None:
    """The evaluation as an MLflow run (tracking.log_to): its scores as metrics, the tables and
    the report page as artifacts."""
    run = RunLog(exp, f"eval-{Path(checkpoint).resolve().parent.name}", out, kind="eval")
    run.params({"checkpoint": str(Path(checkpoint).resolve()), "split": exp.eval.split, "corpus": results["corpus"],
                "engine": results["engine"]})
    run.metrics(flat_metrics({k: v for k, v in results.items() if k != "files"}), step=0)
    for name in ("tables.md", "metrics.json"):
        run.artifact(out / name)
    run.finish()
