"""Predictions -> the paper's metrics, with confidence intervals, baselines and the
hallucinated-comparison rate.

Reports are labelled with the rule-based CheXpert-14 labeler (eval/labeler.py), or with CheXbert
when `eval.chexbert_weights` names a local checkpoint; RadGraph F1 is computed when the radgraph
package and its weights are installed. Whatever is skipped is said in `notes`.

Baselines, from the training split, show what a model that ignores the image scores:
- report generation: always the same findings: "No Finding" alone or the most frequent ones,
  whichever scores best on the training reports;
- grounding: a fixed central box, [25,25,75,75];
- VQA: always the most frequent training answer of the task.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m4cxr.config import Experiment
from m4cxr.data.boxes import iou, parse_box, to_pixels
from m4cxr.data.schema import ImageStore, read_sample_table
from m4cxr.data.templates import task_type
from m4cxr.eval.metrics import bleu4_bootstrap, bootstrap_ci, chexpert_scores, label_matrix, f1_scores, CHEXPERT_14, \
    nlg_scores, rouge_per_sample, vqa_scores

CENTRAL_BOX = (25, 25, 75, 75)

# Words of a report that speak of an earlier study: right in multi-study reports, hallucinated
# in a report written from one study (the flaw the paper names).
COMPARISON = re.compile(
    r"\b(?:compared (?:with|to)|comparison|prior|previous(?:ly)?|preceding|earlier|unchanged|no (?:significant )?change|"
    r"changed|interval|increas(?:ed|ing)|decreas(?:ed|ing)|improv(?:ed|ing|ement)|worsen(?:ed|ing)|stable|"
    r"new(?:ly)?|resolv(?:ed|ing)|redemonstrat\w*|again|persist(?:s|ent|ing)?|since)\b", re.IGNORECASE)


def mentions_comparison(report: str) -> bool:
    return bool(COMPARISON.search(report or ""))


# ----------------------------------------------------------------------------- labelers


def report_labeler(exp: Experiment) -> tuple[Callable[[list[str]], list[dict]], str]:
    """The labeler of the run and its name: CheXbert when configured, else the rule labeler."""
    if exp.eval.chexbert_weights:
        from m4cxr.eval.chexbert import CheXbertLabeler

        chexbert = CheXbertLabeler(exp.eval.chexbert_weights, exp.eval.chexbert_tokenizer)
        return chexbert.label_reports, f"CheXbert ({exp.eval.chexbert_weights})"
    from m4cxr.eval.labeler import label_reports

    return label_reports, "rule-based CheXpert-14 labeler (CheXbert weights not configured)"


def radgraph_f1(hypotheses: list[str], references: list[str]) -> tuple[float | None, str]:
    """RadGraph F1 (mean of the entity and relation F1, partial reward) or None and why not."""
    try:
        from radgraph import F1RadGraph
    except ImportError:
        return None, "RadGraph F1 skipped: the radgraph package is not installed (pip install radgraph)"
    try:
        score = F1RadGraph(reward_level="partial")(hyps=hypotheses, refs=references)[0]
    except Exception as err:  # its weights come from the hub: say why it could not run
        return None, f"RadGraph F1 skipped: {type(err).__name__}: {err}"
    return float(score), ""


# ----------------------------------------------------------------------------- per task type


def score_reports(hyps: list[str], refs: list[str], hyp_labels: list[dict], ref_labels: list[dict],
                  resamples: int, seed: int) -> dict:
    """Clinical efficacy under both conventions, NLG, and bootstrap intervals of the headline ones."""
    out: dict = {**chexpert_scores(hyp_labels, ref_labels), **nlg_scores(hyps, refs), "samples": len(hyps)}
    pred = label_matrix(hyp_labels, CHEXPERT_14, (1,))
    ref = label_matrix(ref_labels, CHEXPERT_14, (1,))
    rouge = rouge_per_sample(hyps, refs)
    out["ci"] = {
        "mF1-14": bootstrap_ci(lambda i: f1_scores(pred[i], ref[i])["micro"], len(hyps), resamples, seed),
        "MF1-14": bootstrap_ci(lambda i: f1_scores(pred[i], ref[i])["macro"], len(hyps), resamples, seed),
        "BLEU-4": bleu4_bootstrap(hyps, refs, resamples, seed),
        "ROUGE-L": bootstrap_ci(lambda i: float(rouge[i].mean()), len(hyps), resamples, seed),
    }
    out["hallucinated_comparison_rate"] = float(np.mean([mentions_comparison(h) for h in hyps])) if hyps else 0.0
    out["reference_comparison_rate"] = float(np.mean([mentions_comparison(r) for r in refs])) if refs else 0.0
    return out


def grounding_ious(answers: Sequence[str], reference_boxes: Sequence[list], sizes: Sequence[tuple[int, int]],
                   convention: str) -> np.ndarray:
    """IoU in image pixels of each answer's first box with the closest reference box; an answer
    without a valid box scores 0."""
    out = []
    for answer, refs, (w, h) in zip(answers, reference_boxes, sizes):
        box = parse_box(answer)
        out.append(max((iou(to_pixels(box, w, h, convention), r) for r in refs), default=0.0) if box else 0.0)
    return np.array(out, dtype=float)


def summarise_ious(ious: np.ndarray, resamples: int, seed: int) -> dict:
    n = len(ious)
    return {"mIoU": float(ious.mean()) if n else 0.0, "acc@0.5": float((ious >= 0.5).mean()) if n else 0.0,
            "samples": n,
            "ci": {"mIoU": bootstrap_ci(lambda i: float(ious[i].mean()), n, resamples, seed),
                   "acc@0.5": bootstrap_ci(lambda i: float((ious[i] >= 0.5).mean()), n, resamples, seed)}}


def score_vqa(answers: list[str], references: list[str], resamples: int, seed: int) -> dict:
    scores = vqa_scores(answers, references)
    per = {k: np.array(v) for k, v in scores.pop("per_sample").items()}
    n = len(answers)
    scores["samples"] = n
    scores["ci"] = {name: bootstrap_ci(lambda i, v=per[key]: float(v[i].mean()), n, resamples, seed)
                    for name, key in (("accuracy", "exact"), ("recall", "recall"), ("BLEU-1", "bleu1"))}
    return scores


# ----------------------------------------------------------------------------- baselines


def frequent_findings_baseline(train: pa.Table, labeler) -> tuple[dict[str, int], str]:
    """The constant answer that a model ignoring the image would learn: of "No Finding" alone and
    the 1..4 most frequent findings, the label set with the best mF1-14 on the training reports."""
    reports = [r for r, t in zip(train.column("report").to_pylist(), train.column("task").to_pylist())
               if r and task_type(t) == "mrg"][:2000]
    labels = labeler(reports)
    counts = Counter(name for lab in labels for name, v in lab.items() if v == 1 and name != "No Finding")
    candidates = [["No Finding"]] + [[n for n, _ in counts.most_common(k)] for k in range(1, 5)]
    ref = label_matrix(labels, CHEXPERT_14, (1,))

    def micro_f1(names: list[str]) -> float:
        const = label_matrix([{n: 1 for n in names}] * len(labels), CHEXPERT_14, (1,))
        return f1_scores(const, ref)["micro"]

    best = max(candidates, key=micro_f1)
    return {n: 1 for n in best}, ", ".join(best)


# ----------------------------------------------------------------------------- the whole run


def score_predictions(exp: Experiment, predictions: pa.Table, corpus_dir: str | Path) -> dict:
    """Every metric of an evaluation run, by task and mode, with baselines and notes."""
    resamples, seed = exp.eval.bootstrap_samples, exp.eval.bootstrap_seed
    labeler, labeler_name = report_labeler(exp)
    samples = {r["sample_id"]: r for r in read_sample_table(corpus_dir, exp.eval.split).to_pylist()}
    store = ImageStore(corpus_dir)
    rows = predictions.to_pylist()
    results: dict = {"labeler": labeler_name, "notes": [], "counts": {}, "mrg": {}, "grounding": {}, "vqa": {},
                     "baselines": {}}
    if not exp.eval.chexbert_weights:
        results["notes"].append("CheXbert skipped: eval.chexbert_weights is not set; labels come from the "
                                "rule-based CheXpert-14 labeler")

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["mode"]), []).append(r)
    kinds = {"mrg": "mrg", "image_understanding": "grounding", "vqa": "vqa"}
    results["datasets"] = {kind: sorted({r["dataset"] for r in rows if kinds[r["task_type"]] == kind})
                           for kind in kinds.values()}
    train = read_sample_table(corpus_dir, "train")
    for (task, mode), group in sorted(groups.items()):
        errors = [f"{r['sample_id']}: {r['error']}" for r in group if r["error"]]
        ok = [r for r in group if not r["error"]]
        key = f"{task}/{mode}" if mode else task
        results["counts"][key] = {"samples": len(group), "errors": len(errors), "error_examples": errors[:5]}
        if errors:
            print(f"eval: {len(errors)} of {len(group)} {key} samples could not be run, e.g. {errors[0]}")
        if not ok:
            continue
        kind = task_type(task)
        if kind == "mrg":
            hyps = [r["prediction"] for r in ok]
            refs = [samples[r["sample_id"]]["report"] or "" for r in ok]
            scores = score_reports(hyps, refs, labeler(hyps), labeler(refs), resamples, seed)
            if exp.eval.radgraph:
                scores["RadGraph F1"], why = radgraph_f1(hyps, refs)
                if why and why not in results["notes"]:
                    results["notes"].append(why)
            results["mrg"].setdefault(task, {})[mode] = scores
        elif task.endswith("grounding") and task != "multi_finding_grounding":
            refs, sizes = [], []
            for r in ok:
                s = samples[r["sample_id"]]
                refs.append([b["box"] for b in s["boxes"] if b["image_index"] == 0])
                sizes.append(store.size(s["images"][0]["image_id"]))
            ious = grounding_ious([r["prediction"] for r in ok], refs, sizes, exp.data.box_convention)
            results["grounding"][task] = {**summarise_ious(ious, resamples, seed), "iou": ious.tolist(),
                                          "malformed": sum(parse_box(r["prediction"]) is None for r in ok)}
            central = grounding_ious(["[25,25,75,75]"] * len(ok), refs, sizes, exp.data.box_convention)
            results["baselines"][task] = {"mIoU": float(central.mean()), "acc@0.5": float((central >= 0.5).mean()),
                                          "what": "a fixed central box [25,25,75,75]"}
        elif kind == "vqa":
            answers = [r["prediction"] for r in ok]
            references = [r["reference"] for r in ok]
            results["vqa"][task] = score_vqa(answers, references, resamples, seed)
            train_answers = [a for a, t in zip(train.column("answer").to_pylist(), train.column("task").to_pylist())
                             if t == task and a]
            frequent = Counter(train_answers).most_common(1)[0][0] if train_answers else ""
            base = vqa_scores([frequent] * len(ok), references)
            results["baselines"][task] = {"accuracy": base["accuracy"], "recall": base["recall"],
                                          "BLEU-1": base["BLEU-1"], "what": f"always {frequent!r}"}
    constant, names = frequent_findings_baseline(train, labeler) if results["mrg"] else ({}, "")
    for task, by_mode in results["mrg"].items():
        mode = next(iter(by_mode))
        refs = [samples[r["sample_id"]]["report"] or "" for r in groups[(task, mode)] if not r["error"]]
        base = chexpert_scores([constant] * len(refs), labeler(refs))["uncertain_as_negative"]
        results["baselines"][task] = {**base, "what": f"always the most frequent findings: {names}"}
    return results


def read_predictions(path: str | Path) -> pa.Table:
    return pq.read_table(path)
