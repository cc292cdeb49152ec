"""Predictions -> the paper's metrics, with confidence intervals, baselines, the
hallucinated-comparison rate and the grounded reports' boxes.

Reports are labelled with the rule-based CheXpert-14 labeler (m4cxr/labeler), or with CheXbert
when `eval.chexbert_weights` names a local checkpoint; RadGraph F1 is computed when the radgraph
package and its weights are installed. Whatever is skipped is said in `notes`.

Baselines, from the training split, show what a model that ignores the image scores:
- report generation: always the same findings: "No Finding" alone or the most frequent ones,
  whichever scores best on the training reports;
- grounding: a fixed central box, [25,25,75,75];
- VQA: always the most frequent training answer of the task.

A grounded report's sentence that states a present finding is scored against the ground-truth
boxes of that finding on the image it was grounded on (the boxes of the split's grounding samples
whose label states the same CheXpert observation): IoU with the closest, a sentence answered
without a box scoring 0, as in phrase grounding. Reports of images without such boxes are left
out and counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m4cxr.boxes import format_box, iou, parse_box, to_pixels
from m4cxr.config import Experiment
from m4cxr.data.schema import ImageStore, read_sample_table, samples_path
from m4cxr.labeler import label_reports, measured_agreement, rule_labeler_name
# the words of a report that speak of an earlier study: right in multi-study reports, hallucinated
# in a report written from one study (the flaw the paper names); the same rules data.prior_references
# removes from the training targets
from m4cxr.labeler.prior_references import mentions_prior
from m4cxr.report_grounding import stated_findings
from m4cxr.tasks import RESULT_GROUPS, report_scenarios, result_group, scored_as
from m4cxr.eval.metrics import (
    CHEXPERT_14, bleu4_bootstrap, bootstrap_ci, chexpert_scores, f1_scores, grounding_scores, label_matrix, nlg_scores,
    rouge_per_sample, vqa_scores,
)

CENTRAL_BOX = (25, 25, 75, 75)
log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------- labelers


def report_labeler(exp: Experiment) -> tuple[Callable[[list[str]], list[dict]], str]:
    """The labeler of the run and its name: CheXbert when configured, else the rule labeler, named
    with its measured agreement with expert labels so that its figures are not taken for CheXbert's."""
    if exp.eval.chexbert_weights:
        from m4cxr.labeler.chexbert import CheXbertLabeler  # torch and transformers: only when configured

        chexbert = CheXbertLabeler(exp.eval.chexbert_weights, exp.eval.chexbert_tokenizer)
        return chexbert.label_reports, f"CheXbert ({exp.eval.chexbert_weights})"
    return label_reports, rule_labeler_name()


def labeler_agreement(exp: Experiment) -> dict | None:
    """The rule labeler's measured agreement (benchmarks/labeler_agreement.py), None for CheXbert."""
    if exp.eval.chexbert_weights:
        return None
    agreement = measured_agreement()
    return None if agreement is None else {k: agreement[k] for k in ("micro_f1", "held_out_micro_f1", "reports",
                                                                      "per_observation_f1", "gold", "benchmark")}


def radgraph_f1(hypotheses: list[str], references: list[str]) -> tuple[float | None, str]:
    """RadGraph F1 (mean of the entity and relation F1, partial reward) or None and why not."""
    try:
        from radgraph import F1RadGraph  # optional, with weights from the hub
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
    out["hallucinated_comparison_rate"] = float(np.mean([mentions_prior(h) for h in hyps])) if hyps else 0.0
    out["reference_comparison_rate"] = float(np.mean([mentions_prior(r) for r in refs])) if refs else 0.0
    return out


def score_vqa(answers: list[str], references: list[str], resamples: int, seed: int) -> dict:
    scores = vqa_scores(answers, references)
    per = {k: np.array(v) for k, v in scores.pop("per_sample").items()}
    n = len(answers)
    scores["samples"] = n
    scores["ci"] = {name: bootstrap_ci(lambda i, v=per[key]: float(v[i].mean()), n, resamples, seed)
                    for name, key in (("accuracy", "exact"), ("recall", "recall"), ("BLEU-1", "bleu1"))}
    return scores


# ----------------------------------------------------------------------------- baselines


def frequent_findings_baseline(train: pa.Table) -> tuple[dict[str, int], str]:
    """The constant answer that a model ignoring the image would learn: of "No Finding" alone and
    the 1..4 most frequent findings, the label set with the best mF1-14 on the training reports'
    own labels (the record's CheXbert-style labels, which the CoT answers come from)."""
    report_tasks = set(report_scenarios())
    labels = [{item["name"]: item["value"] for item in labs}
              for labs, t in zip(train.column("labels").to_pylist(), train.column("task").to_pylist())
              if t in report_tasks]
    counts = Counter(name for lab in labels for name, v in lab.items() if v == 1 and name != "No Finding")
    candidates = [["No Finding"]] + [[n for n, _ in counts.most_common(k)] for k in range(1, 5)]
    ref = label_matrix(labels, CHEXPERT_14, (1,))

    def micro_f1(names: list[str]) -> float:
        const = label_matrix([{n: 1 for n in names}] * len(labels), CHEXPERT_14, (1,))
        return f1_scores(const, ref)["micro"]

    best = max(candidates, key=micro_f1)
    return {n: 1 for n in best}, ", ".join(best)


# ----------------------------------------------------------------------------- the whole run


class Scoring:
    """What scoring one run needs at hand: the settings, the labeler, the test samples, the
    image sizes, and the references' labels (computed once: both CoT modes share them)."""

    def __init__(self, exp: Experiment, corpus_dir: str | Path):
        self.exp = exp
        self.resamples, self.seed = exp.eval.bootstrap_samples, exp.eval.bootstrap_seed
        self.labeler, self.labeler_name = report_labeler(exp)
        self.samples = {r["sample_id"]: r for r in read_sample_table(corpus_dir, exp.eval.split).to_pylist()}
        self.store = ImageStore(corpus_dir)
        self.train = pq.read_table(samples_path(corpus_dir, "train"), columns=["task", "labels", "answer"])
        self.reference_labels: dict[str, dict] = {}
        self.truth_boxes: dict[str, list] | None = None

    def labels_of_references(self, rows: list[dict]) -> list[dict]:
        todo = [r["sample_id"] for r in rows if r["sample_id"] not in self.reference_labels]
        for sid, lab in zip(todo, self.labeler([self.samples[sid]["report"] or "" for sid in todo])):
            self.reference_labels[sid] = lab
        return [self.reference_labels[r["sample_id"]] for r in rows]

    def reports(self, rows: list[dict], notes: list[str]) -> dict:
        hyps = [r["prediction"] for r in rows]
        refs = [self.samples[r["sample_id"]]["report"] or "" for r in rows]
        scores = score_reports(hyps, refs, self.labeler(hyps), self.labels_of_references(rows), self.resamples,
                               self.seed)
        if self.exp.eval.radgraph:
            scores["RadGraph F1"], why = radgraph_f1(hyps, refs)
            if why and why not in notes:
                notes.append(why)
        return scores

    def boxes(self, rows: list[dict]) -> tuple[dict, dict]:
        """The grounding scores of the rows, and the central-box baseline's."""
        refs, sizes = [], []
        for r in rows:
            s = self.samples[r["sample_id"]]
            refs.append([b["box"] for b in s["boxes"] if b["image_index"] == 0])
            sizes.append(self.store.size(s["images"][0]["image_id"]))
        answers = [r["prediction"] for r in rows]
        convention = self.exp.data.box_convention
        scores = grounding_scores(answers, refs, sizes, convention)
        ious = np.array(scores["iou"])
        scores["samples"] = len(ious)
        scores["ci"] = {
            "mIoU": bootstrap_ci(lambda i: float(ious[i].mean()), len(ious), self.resamples, self.seed),
            "acc@0.5": bootstrap_ci(lambda i: float((ious[i] >= 0.5).mean()), len(ious), self.resamples, self.seed)}
        scores["malformed"] = sum(parse_box(a) is None for a in answers)
        central = grounding_scores([format_box(CENTRAL_BOX)] * len(rows), refs, sizes, convention)
        baseline = {"mIoU": central["mIoU"], "acc@0.5": central["acc@0.5"],
                    "what": f"a fixed central box {format_box(CENTRAL_BOX)}"}
        return scores, baseline

    def finding_boxes(self) -> dict[str, list[tuple[frozenset, tuple]]]:
        """image id -> (the observations its label states, the box in pixels) of every box of a
        finding in the split's samples (an organ's or a region's states none)."""
        if self.truth_boxes is None:
            observations: dict[str, frozenset] = {}
            found: dict[str, set] = {}
            for s in self.samples.values():
                for b in s["boxes"] or []:
                    if b["label"] not in observations:
                        observations[b["label"]] = frozenset(stated_findings(b["label"]))
                    if observations[b["label"]]:
                        image_id = s["images"][b["image_index"]]["image_id"]
                        found.setdefault(image_id, set()).add((observations[b["label"]], tuple(b["box"])))
            self.truth_boxes = {k: sorted(v, key=lambda e: (sorted(e[0]), e[1])) for k, v in found.items()}
        return self.truth_boxes

    def grounded_reports(self, rows: list[dict]) -> dict | None:
        """The boxes of grounded report sentences against the ground truth of the findings they
        state; None when no report's image has finding boxes."""
        truth, convention = self.finding_boxes(), self.exp.data.box_convention
        ious, boxed, unmatched, without_truth, reports = [], 0, 0, 0, 0
        findings = covered = 0
        for r in rows:
            sample = self.samples[r["sample_id"]]
            image_id = next(i["image_id"] for i in sample["images"] if i["role"] == "current")
            boxes = truth.get(image_id)
            if not boxes:
                without_truth += 1
                continue
            reports += 1
            size, boxed_findings = self.store.size(image_id), set()
            for sentence in json.loads(r["grounded"]):
                stated = set(sentence["findings"])
                if not stated:
                    continue
                refs = [box for obs, box in boxes if obs & stated]
                if not refs:  # a finding the image's ground truth does not hold
                    unmatched += 1
                    continue
                if sentence["box"] is None:
                    ious.append(0.0)
                    continue
                boxed += 1
                boxed_findings |= stated
                pixels = to_pixels(sentence["box"], *size, convention)
                ious.append(max(iou(pixels, ref) for ref in refs))
            findings += len(boxes)
            covered += sum(bool(obs & boxed_findings) for obs, _ in boxes)
        if not reports:
            return None
        values = np.array(ious, dtype=float)
        ci = {"mIoU": bootstrap_ci(lambda i: float(values[i].mean()), len(values), self.resamples, self.seed),
              "acc@0.5": bootstrap_ci(lambda i: float((values[i] >= 0.5).mean()), len(values), self.resamples,
                                      self.seed)} if len(values) else {}
        return {"reports": reports, "sentences": len(values), "boxed": boxed,
                "box_rate": boxed / len(values) if len(values) else 0.0,
                "mIoU": float(values.mean()) if len(values) else 0.0,
                "acc@0.5": float((values >= 0.5).mean()) if len(values) else 0.0, "ci": ci,
                "findings": findings, "findings_boxed": covered,
                "finding_coverage": covered / findings if findings else 0.0,
                "sentences_without_truth": unmatched, "reports_without_truth_boxes": without_truth}

    def answers(self, task: str, rows: list[dict]) -> tuple[dict, dict, dict | None]:
        """The VQA scores of the rows, the most-frequent-answer baseline's, and the scores per
        test set when there are several (Table 4 has a column pair per set)."""
        answers = [r["prediction"] for r in rows]
        references = [r["reference"] for r in rows]
        scores = score_vqa(answers, references, self.resamples, self.seed)
        by_dataset: dict[str, list[dict]] = {}
        for r in rows:
            by_dataset.setdefault(r["dataset"], []).append(r)
        per_set = None
        if len(by_dataset) > 1:
            per_set = {d: score_vqa([r["prediction"] for r in rs], [r["reference"] for r in rs], self.resamples,
                                    self.seed) for d, rs in sorted(by_dataset.items())}
        tasks = self.train.column("task").to_pylist()
        train_answers = [a for a, t in zip(self.train.column("answer").to_pylist(), tasks) if t == task and a]
        frequent = Counter(train_answers).most_common(1)[0][0] if train_answers else ""
        base = vqa_scores([frequent] * len(rows), references)
        baseline = {"accuracy": base["accuracy"], "recall": base["recall"], "BLEU-1": base["BLEU-1"],
                    "what": f"always {frequent!r}"}
        return scores, baseline, per_set


def score_predictions(exp: Experiment, predictions: pa.Table, corpus_dir: str | Path) -> dict:
    """Every metric of an evaluation run, by task and mode, with baselines and notes. Each task is
    scored as tasks.yaml says (`scored_as`: report, box, answer) into its results section."""
    scoring = Scoring(exp, corpus_dir)
    rows = predictions.to_pylist()
    results: dict = {"labeler": scoring.labeler_name, "labeler_agreement": labeler_agreement(exp), "notes": [],
                     "counts": {}, "mrg": {}, "grounding": {}, "vqa": {}, "baselines": {}}
    if not exp.eval.chexbert_weights:
        results["notes"].append("CheXbert skipped: eval.chexbert_weights is not set; labels come from the "
                                "rule-based CheXpert-14 labeler")
    results["datasets"] = {group: sorted({r["dataset"] for r in rows if result_group(r["task"]) == group})
                           for group in RESULT_GROUPS.values()}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["mode"]), []).append(r)
    for (task, mode), group in sorted(groups.items()):
        ok = count_errors(results["counts"], f"{task}/{mode}" if mode else task, group)
        if not ok:
            continue
        kind = scored_as(task)
        if kind == "report":
            results["mrg"].setdefault(task, {})[mode] = scoring.reports(ok, results["notes"])
        elif kind == "box":
            results["grounding"][task], results["baselines"][task] = scoring.boxes(ok)
        elif kind == "answer":
            results["vqa"][task], results["baselines"][task], per_set = scoring.answers(task, ok)
            if per_set:
                results.setdefault("vqa_by_dataset", {})[task] = per_set
    report_baselines(scoring, results, groups)
    for (task, mode), group in sorted(groups.items()):
        grounded = [r for r in group if r["grounded"] and not r["error"]]
        if grounded and (scored := scoring.grounded_reports(grounded)):
            results.setdefault("grounded_reports", {})[task] = dict(scored, mode=mode)
    return results


def count_errors(counts: dict, key: str, group: list[dict]) -> list[dict]:
    """Records the group's samples and errors under `key`; returns the rows that ran."""
    errors = [f"{r['sample_id']}: {r['error']}" for r in group if r["error"]]
    counts[key] = {"samples": len(group), "errors": len(errors), "error_examples": errors[:5]}
    if errors:
        log.warning("eval: %d of %d %s samples could not be run, e.g. %s", len(errors), len(group), key, errors[0])
    return [r for r in group if not r["error"]]


def report_baselines(scoring: Scoring, results: dict, groups: dict) -> None:
    """Each report task's baseline: always the most frequent findings of the training split."""
    constant, names = frequent_findings_baseline(scoring.train) if results["mrg"] else ({}, "")
    for task, by_mode in results["mrg"].items():
        ok = [r for r in groups[(task, next(iter(by_mode)))] if not r["error"]]
        base = chexpert_scores([constant] * len(ok), scoring.labels_of_references(ok))["uncertain_as_negative"]
        results["baselines"][task] = {**base, "what": f"always the most frequent findings: {names}"}
