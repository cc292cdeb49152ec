"""The paper's metrics.

- Clinical efficacy from CheXpert-14 labels of generated and reference reports: micro F1 (mF1),
  macro F1 (MF1, undefined per-label F1 counts as 0) and example-based F1 (eF1, per report,
  undefined counts as 0), over the 14 observations and the 5 of CheXbert's -5 set, under both
  conventions: uncertain (-1) as negative (the authors' primary scores) and as positive.
- NLG: BLEU-1..4 and ROUGE-L with pycocoevalcap's own scorers, on lower-cased,
  punctuation-split text (no Java tokenizer).
- Grounding: IoU per sample, mIoU, accuracy at IoU >= 0.5; a malformed box scores 0.
- VQA: exact-match accuracy, recall of reference words, BLEU-1 per sample averaged.
- A bootstrap 95% confidence interval for any per-sample metric.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.rouge.rouge import Rouge

from m4cxr.boxes import iou, parse_box, to_pixels
from m4cxr.tasks import chexbert_labels, chexpert_5

CHEXPERT_14 = chexbert_labels()
CHEXPERT_5 = chexpert_5()
CONVENTIONS = {"uncertain_as_negative": (1,), "uncertain_as_positive": (1, -1)}


# ----------------------------------------------------------------------------- NLG


def tokenize_report(text: str) -> str:
    """Lower-case, punctuation split off as tokens, single spaces."""
    return " ".join(re.findall(r"\w+|[^\w\s]", text.lower()))


def nlg_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str] | str], tokenize: bool = True) -> dict:
    """Corpus BLEU-1..4 and ROUGE-L (pycocoevalcap). `references[i]` is one text or a list of texts."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    prep = tokenize_report if tokenize else (lambda t: t.strip())
    res = {i: [prep(h)] for i, h in enumerate(hypotheses)}
    gts = {i: [prep(r) for r in ([refs] if isinstance(refs, str) else refs)] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    return {**{f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}, "ROUGE-L": float(rouge)}


def rouge_per_sample(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """ROUGE-L of each report (pycocoevalcap); their mean is the corpus ROUGE-L."""
    if not hypotheses:
        return np.zeros(0)
    res = {i: [tokenize_report(h)] for i, h in enumerate(hypotheses)}
    gts = {i: [tokenize_report(r)] for i, r in enumerate(references)}
    return np.asarray(Rouge().compute_score(gts, res)[1], dtype=float)


def bleu4_bootstrap(hypotheses: Sequence[str], references: Sequence[str], resamples: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of corpus BLEU-4: each report's n-gram counts are computed once by
    pycocoevalcap's BleuScorer, then resampled and pooled by the same scorer."""
    cooked = BleuScorer(n=4)
    for h, r in zip(hypotheses, references):
        cooked += (tokenize_report(h), [tokenize_report(r)])

    def bleu4(idx: np.ndarray) -> float:
        s = BleuScorer(n=4)
        s.crefs = [cooked.crefs[i] for i in idx]
        s.ctest = [cooked.ctest[i] for i in idx]
        return float(s.compute_score(option="closest")[0][3])

    return bootstrap_ci(bleu4, len(hypotheses), resamples, seed)


# ----------------------------------------------------------------------------- clinical efficacy


def label_matrix(labels: Sequence[dict[str, int | None]], observations: Sequence[str], positive: tuple) -> np.ndarray:
    """Reports x observations, 1 where the label counts as positive under the convention."""
    return np.array([[1 if lab.get(o) in positive else 0 for o in observations] for lab in labels], dtype=np.int64)


def f1_scores(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    tp = (pred & ref).sum(0)
    fp = (pred & (1 - ref)).sum(0)
    fn = ((1 - pred) & ref).sum(0)
    micro = 2 * tp.sum() / max(1, 2 * tp.sum() + fp.sum() + fn.sum())
    per_label = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(1, 2 * tp + fp + fn), 0.0)
    tp_r, fp_r, fn_r = (pred & ref).sum(1), (pred & (1 - ref)).sum(1), ((1 - pred) & ref).sum(1)
    per_report = np.where(2 * tp_r + fp_r + fn_r > 0, 2 * tp_r / np.maximum(1, 2 * tp_r + fp_r + fn_r), 0.0)
    return {"micro": float(micro), "macro": float(per_label.mean()), "example": float(per_report.mean())}


def chexpert_scores(generated: Sequence[dict], reference: Sequence[dict]) -> dict[str, dict[str, float]]:
    """mF1-14, MF1-14, mF1-5, MF1-5 and eF1-14 under both conventions."""
    if len(generated) != len(reference):
        raise ValueError(f"{len(generated)} generated label sets but {len(reference)} references")
    out = {}
    for name, positive in CONVENTIONS.items():
        s14 = f1_scores(label_matrix(generated, CHEXPERT_14, positive), label_matrix(reference, CHEXPERT_14, positive))
        s5 = f1_scores(label_matrix(generated, CHEXPERT_5, positive), label_matrix(reference, CHEXPERT_5, positive))
        out[name] = {"mF1-14": s14["micro"], "MF1-14": s14["macro"], "mF1-5": s5["micro"], "MF1-5": s5["macro"],
                     "eF1-14": s14["example"]}
    return out


# ----------------------------------------------------------------------------- grounding and VQA


def grounding_scores(answers: Sequence[str], reference_boxes: Sequence, frames: Sequence[tuple[int, int]] | None = None,
                     convention: str = "resize") -> dict:
    """IoU of each answer's first box with its closest reference box (a sample's reference is a
    box or a list of boxes); a missing or malformed box scores 0. With `frames` (width, height per
    sample) the 0-100 answer is mapped to pixels and compared with pixel references."""
    ious = []
    for k, (answer, refs) in enumerate(zip(answers, reference_boxes)):
        box = parse_box(answer)
        refs = [refs] if refs is not None and len(refs) and isinstance(refs[0], (int, float)) else list(refs or [])
        if box is not None and frames is not None:
            box = to_pixels(box, *frames[k], convention)
        ious.append(max((iou(box, r) for r in refs), default=0.0) if box is not None else 0.0)
    ious = np.array(ious, dtype=float)
    return {"mIoU": float(ious.mean()) if len(ious) else 0.0,
            "acc@0.5": float((ious >= 0.5).mean()) if len(ious) else 0.0, "iou": ious.tolist()}


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def vqa_scores(answers: Sequence[str], references: Sequence[str]) -> dict:
    exact = np.array([_words(a) == _words(r) for a, r in zip(answers, references)], dtype=float)
    recall = np.array([np.mean([w in set(_words(a)) for w in _words(r)]) if _words(r) else 0.0
                       for a, r in zip(answers, references)], dtype=float)
    bleu1 = []
    for a, r in zip(answers, references):  # per sample, then averaged
        score, _ = Bleu(1).compute_score({0: [" ".join(_words(r))]}, {0: [" ".join(_words(a)) or "<empty>"]}, verbose=0)
        bleu1.append(float(score[0]))
    return {"accuracy": float(exact.mean()) if len(exact) else 0.0, "recall": float(recall.mean()) if len(recall) else 0.0,
            "BLEU-1": float(np.mean(bleu1)) if bleu1 else 0.0,
            "per_sample": {"exact": exact.tolist(), "recall": recall.tolist(), "bleu1": bleu1}}


# ----------------------------------------------------------------------------- confidence intervals


def bootstrap_ci(metric: Callable[[np.ndarray], float], n: int, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric(indices)` over test samples (resampled with
    replacement), e.g. lambda idx: per_sample_iou[idx].mean()."""
    if n == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    values = np.array([metric(rng.integers(0, n, n)) for _ in range(resamples)])
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
