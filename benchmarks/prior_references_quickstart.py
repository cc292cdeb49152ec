"""The quickstart trained with `data.prior_references: keep` and with `remove`, same corpus, seed
and steps: how often each model's reports speak of a prior study it was not given, and what
removing the references costs in report quality.

    python benchmarks/prior_references_quickstart.py [--out runs/prior_references] [--analyse-only]

One synthetic world (experiments/quickstart.yaml, seed 0) and one tokenizer; then for each
setting stage 1, stage 2 and `m4cxr eval` on the test split. From each evaluation's predictions
(the headline CoT mode): the share of single-image and multi-image reports that mention a prior
study (labeler/prior_references.py's PRIOR_REFERENCE, the evaluation's comparison measure), with
95% bootstrap intervals, and mF1-14, MF1-14, BLEU-4 and ROUGE-L of the single-image reports with
the evaluation's own intervals. `--analyse-only` re-reads the two evaluations.
Writes benchmarks/results/prior_references_quickstart.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

SETTINGS = ("keep", "remove")
SCENARIOS = ("single_image", "multi_image", "multi_study")


def train_and_evaluate(out: Path) -> None:
    from m4cxr.config import load_experiment
    from m4cxr.data.synthetic import synthesize
    from m4cxr.eval.run import evaluate
    from m4cxr.train.run import prepare_tokenizer, run_stage

    corpus = out / "corpus"
    base = [f"data.corpus_dir={corpus}", "tracking.log_to=[]"]
    exp = load_experiment(ROOT / "experiments/quickstart.yaml", base)
    if not (corpus / "manifest.json").is_file():
        synthesize(str(corpus), exp.data.synthetic, exp.data.box_convention, exp.data.system_prompt)
    prepare_tokenizer(exp, str(corpus))
    for setting in SETTINGS:
        if (out / setting / "eval" / "metrics.json").is_file():
            continue
        exp = load_experiment(ROOT / "experiments/quickstart.yaml",
                              [*base, f"data.prior_references={setting}", f"train.output_dir={out / setting / 'train'}"])
        started = time.time()
        stage1 = run_stage(exp, "pretrain", str(corpus), track=False)
        stage2 = run_stage(exp, "instruction", str(corpus), init_checkpoint=stage1["checkpoint"], track=False)
        evaluate(exp, stage2["checkpoint"], out / setting / "eval", str(corpus))
        logging.info("%s: trained and evaluated in %.0fs", setting, time.time() - started)


def rate_with_interval(flags: list[bool], resamples: int = 1000, seed: int = 0) -> dict:
    from m4cxr.eval.metrics import bootstrap_ci

    values = np.array(flags, dtype=float)
    lo, hi = bootstrap_ci(lambda i: float(values[i].mean()), len(values), resamples, seed)
    return {"rate": float(values.mean()), "ci": [lo, hi], "reports": len(values), "mentioning": int(values.sum())}


def analyse(out: Path) -> dict:
    from m4cxr.labeler.prior_references import mentions_prior

    results: dict = {}
    for setting in SETTINGS:
        metrics = json.loads((out / setting / "eval" / "metrics.json").read_text())
        mode = "cot"
        rows = [r for r in pq.read_table(out / setting / "eval" / "predictions.parquet").to_pylist()
                if r["mode"] == mode and not r["error"]]
        single = metrics["mrg"]["single_image"][mode]
        results[setting] = {
            "comparison": {s: rate_with_interval([mentions_prior(r["prediction"]) for r in rows if r["task"] == s])
                           for s in SCENARIOS},
            "single_image": {name: {"value": value(single, name), "ci": single["ci"].get(name)}
                             for name in ("mF1-14", "MF1-14", "BLEU-4", "ROUGE-L")},
            "reference_comparison": {s: rate_with_interval([mentions_prior(r["reference"]) for r in rows
                                                            if r["task"] == s]) for s in SCENARIOS},
            "single_image_vs_references_without_priors": text_scores_without_priors(
                [r for r in rows if r["task"] == "single_image"]),
        }
    results["machine"] = f"{platform.machine()}, Python {platform.python_version()}"
    return results


def text_scores_without_priors(rows: list[dict]) -> dict:
    """BLEU-4 and ROUGE-L against the references rewritten as the `remove` targets are: the
    test references keep their comparisons, which a model trained with `remove` no longer writes."""
    from m4cxr.data.prior_references import rewrite
    from m4cxr.eval.metrics import bleu4_bootstrap, bootstrap_ci, nlg_scores, rouge_per_sample

    hyps = [r["prediction"] for r in rows]
    refs = [rewrite(r["reference"]).text for r in rows]
    scores = nlg_scores(hyps, refs)
    rouge = rouge_per_sample(hyps, refs)
    return {"BLEU-4": {"value": scores["BLEU-4"], "ci": list(bleu4_bootstrap(hyps, refs, 1000, 0))},
            "ROUGE-L": {"value": scores["ROUGE-L"],
                        "ci": list(bootstrap_ci(lambda i: float(rouge[i].mean()), len(rouge), 1000, 0))}}


def value(scores: dict, name: str) -> float:
    return scores["uncertain_as_negative"][name] if name in scores["uncertain_as_negative"] else scores[name]


def markdown(results: dict) -> str:
    def pct(x):
        return f"{100 * x:.1f}"

    lines = ["| setting | comparison in single-image reports | multi-image | multi-study (has a prior) | "
             "single-image mF1-14 | MF1-14 | BLEU-4 | ROUGE-L |", "|---|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        r = results[setting]
        cells = [f"{pct(c['rate'])} ({pct(c['ci'][0])}-{pct(c['ci'][1])}), {c['mentioning']}/{c['reports']}"
                 for c in (r["comparison"][s] for s in SCENARIOS)]
        cells += [f"{pct(m['value'])} ({pct(m['ci'][0])}-{pct(m['ci'][1])})" if m["ci"] else pct(m["value"])
                  for m in r["single_image"].values()]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    lines += ["", "| setting | single-image BLEU-4 against references without priors | ROUGE-L |", "|---|---|---|"]
    for setting in SETTINGS:
        r = results[setting]["single_image_vs_references_without_priors"]
        lines.append(f"| {setting} | " + " | ".join(f"{pct(m['value'])} ({pct(m['ci'][0])}-{pct(m['ci'][1])})"
                                                   for m in r.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs/prior_references")
    parser.add_argument("--analyse-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not args.analyse_only:
        train_and_evaluate(args.out)
    results = analyse(args.out)
    path = ROOT / "benchmarks/results/prior_references_quickstart.json"
    path.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
