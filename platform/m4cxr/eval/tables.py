"""Markdown tables in the shapes of the paper's Tables 1-5 and 7.

Each table has this run's row(s); the paper's own figures (resources/paper_results.yaml) are
printed beside them only when the run's test set is the paper's (MIMIC-CXR for report
generation, MS-CXR for grounding, MIMIC-CXR-VQA and SLAKE for VQA): next to a synthetic or
private test set they would invite a comparison that means nothing.
All numbers are percentages, as in the paper; "-" is not measured.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any, Sequence

import yaml

from m4cxr.config import Experiment

UNCERTAIN_AS_NEGATIVE = "uncertain_as_negative"


@lru_cache(maxsize=1)
def paper_results() -> dict[str, Any]:
    return yaml.safe_load(resources.files("m4cxr").joinpath("resources/paper_results.yaml").read_text())


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def paper_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mrg_values(scores: dict, names: Sequence[str]) -> list[float | None]:
    """Values of `names` from one scenario's scores (label F1s in the uncertain-as-negative convention)."""
    ce = scores.get(UNCERTAIN_AS_NEGATIVE, {})
    return [ce[n] if n in ce else scores.get(n) for n in names]


def headline(results: dict, exp: Experiment) -> dict[str, float | None]:
    """The six numbers of Tables 5 and 7 for a mode: mF1-14, MF1-14, BLEU-4, ROUGE-L, mIoU, VQA BLEU-1."""
    mode = "cot" if exp.eval.cot else "no_cot"
    single = results["mrg"].get("single_image", {}).get(mode, {})
    ground = results["grounding"].get("phrase_grounding", {})
    vqa = results["vqa"].get("vqa", {})
    return dict(zip(["mF1-14", "MF1-14", "BLEU-4", "ROUGE-L"], mrg_values(single, ["mF1-14", "MF1-14", "BLEU-4", "ROUGE-L"]))) | {
        "mIoU": ground.get("mIoU"), "VQA BLEU-1": vqa.get("BLEU-1")}


def test_datasets(results: dict) -> dict[str, set[str]]:
    return {kind: set(results.get("datasets", {}).get(kind, [])) for kind in ("mrg", "grounding", "vqa")}


def render_tables(results: dict, exp: Experiment) -> str:
    paper = paper_results()
    datasets = test_datasets(results)
    paper_mrg = paper["test_sets"]["mrg"] in datasets["mrg"]
    paper_grounding = paper["test_sets"]["grounding"] in datasets["grounding"]
    sets = ", ".join(sorted(set().union(*datasets.values()))) or "?"
    out = [f"# Evaluation of {exp.name}", "",
           f"Test split `{exp.eval.split}` of {sets}. Labels: {results['labeler']}; F1s count uncertain as "
           f"negative (the paper's primary convention). Percentages."]
    if not (paper_mrg or paper_grounding):
        out.append("The paper's figures are left out: this is not the paper's test set.")
    out += [f"- {n}" for n in results.get("notes", [])]
    mode = "cot" if exp.eval.cot else "no_cot"

    # Table 1
    cols = paper["table1"]["columns"]
    single = results["mrg"].get("single_image", {})
    if mode in single:
        rows = [[f"this run ({single[mode]['samples']} images, {mode.replace('_', ' ')})",
                 *map(pct, mrg_values(single[mode], cols))]]
        if paper_mrg:
            rows += [[name, *map(paper_pct, vals)] for name, vals in paper["table1"]["rows"].items()]
        out += ["", "## Table 1: report generation, single image", "", markdown_table(["test set", *cols], rows)]

    # Table 2
    rows = []
    for scenario in ("single_image", "multi_image", "multi_study"):
        s = results["mrg"].get(scenario, {}).get(mode)
        if s is None:
            continue
        ours = " / ".join(pct(v) for v in mrg_values(s, ["mF1-14", "MF1-14"]))
        peers = "; ".join(f"{k} {paper_pct(v[0])} / {paper_pct(v[1])}" for k, v in paper["table2"][scenario].items())
        rows.append([scenario.replace("_", "-"), ours, pct(s["hallucinated_comparison_rate"]),
                     pct(s["reference_comparison_rate"])] + ([peers] if paper_mrg else []))
    if rows:
        header = ["scenario", "this run mF1-14 / MF1-14", "comparison in generated", "in references"] + \
            (["paper"] if paper_mrg else [])
        out += ["", "## Table 2: report-generation scenarios", "", markdown_table(header, rows),
                "", "Comparison: the share of reports that speak of a prior study or a change. Only multi-study "
                    "has a prior to compare with; elsewhere it is hallucinated (references may carry it too, as "
                    "MIMIC-CXR's do)."]

    # Table 3
    g = results["grounding"].get("phrase_grounding")
    if g:
        rows = [[f"this run ({g['samples']} samples)", pct(g["acc@0.5"]), pct(g["mIoU"])]]
        if paper_grounding:
            rows += [[k, paper_pct(v[0]), paper_pct(v[1])] for k, v in paper["table3"].items()]
        out += ["", "## Table 3: phrase grounding", "", markdown_table(["model", "accuracy (IoU >= 0.5)", "mIoU"], rows)]

    # Table 4
    rows = []
    for task, v in results["vqa"].items():
        rows.append([f"this run: {task} ({v['samples']} samples)", pct(v["accuracy"]), pct(v["recall"]), pct(v["BLEU-1"])])
        for dataset, d in results.get("vqa_by_dataset", {}).get(task, {}).items():
            rows.append([f"this run: {task} on {dataset} ({d['samples']} samples)", pct(d["accuracy"]),
                         pct(d["recall"]), pct(d["BLEU-1"])])
    for dataset in paper["test_sets"]["vqa"]:
        if dataset in datasets["vqa"]:
            rows += [[f"{k} ({dataset})", *map(paper_pct, vals)] for k, vals in paper["table4"][dataset].items()]
    if rows:
        out += ["", "## Table 4: VQA", "", markdown_table(["model", "accuracy", "recall", "BLEU-1"], rows)]

    # Table 5 (this run with and without CoT) and Table 7 (this run's sampling strategy)
    six = ["mF1-14", "MF1-14", "BLEU-4", "ROUGE-L", "mIoU", "VQA BLEU-1"]
    rows = []
    for m in ("cot", "no_cot"):
        s = single.get(m)
        if s is None:
            continue
        vals = mrg_values(s, six[:4]) + ([headline(results, exp)["mIoU"], headline(results, exp)["VQA BLEU-1"]]
                                         if m == mode else [None, None])
        rows.append([exp.name, "yes" if m == "cot" else "no", " / ".join(map(pct, vals))])
    if paper_mrg:
        rows += [[f"paper {r['run']} ({r['training']})", "yes" if r["cot"] else "no",
                  " / ".join(map(paper_pct, r["result"]))] for r in paper["table5"]]
    if rows:
        out += ["", "## Table 5: ablation row", "", markdown_table(["run", "test CoT", " / ".join(six)], rows)]
        h = headline(results, exp)
        strategy = exp.data.mixture.strategy
        rows = [[f"this run ({strategy})", " / ".join(pct(h[k]) for k in six)]]
        if paper_mrg:
            rows += [[f"paper {k}", " / ".join(map(paper_pct, v))] for k, v in paper["table7"].items()]
        out += ["", "## Table 7: sampling strategy row", "", markdown_table(["strategy", " / ".join(six)], rows)]

    # intervals
    rows = []
    for scenario, by_mode in results["mrg"].items():
        for m, s in by_mode.items():
            for name, (lo, hi) in s["ci"].items():
                rows.append([f"{scenario} ({m})", name, pct(mrg_values(s, [name])[0]), f"{pct(lo)} - {pct(hi)}"])
    for kind in ("grounding", "vqa"):
        for task, s in results[kind].items():
            for name, (lo, hi) in s["ci"].items():
                rows.append([task, name, pct(s[name]), f"{pct(lo)} - {pct(hi)}"])
    if rows:
        out += ["", f"## 95% bootstrap intervals ({exp.eval.bootstrap_samples} resamples of the test samples)", "",
                markdown_table(["task", "metric", "value", "interval"], rows)]

    # baselines
    rows = []
    for task, b in results["baselines"].items():
        shown = {k: v for k, v in b.items() if k in ("mF1-14", "MF1-14", "mIoU", "acc@0.5", "accuracy")}
        rows.append([task, b["what"], ", ".join(f"{k} {pct(v)}" for k, v in shown.items())])
    if rows:
        out += ["", "## Baselines that ignore the image", "", markdown_table(["task", "baseline", "scores"], rows)]
    counts = [[k, v["samples"], v["errors"]] for k, v in results["counts"].items()]
    out += ["", "## Samples", "", markdown_table(["task", "samples", "could not be run"], counts)]
    return "\n".join(out) + "\n"
