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
from m4cxr.tasks import RESULT_GROUPS, headline_task, report_scenarios

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
    """The six numbers of Tables 5 and 7 for a mode: mF1-14, MF1-14, BLEU-4, ROUGE-L, mIoU, VQA
    BLEU-1, of the headline task of each kind (tasks.yaml: single image, phrase grounding, VQA)."""
    mode = "cot" if exp.eval.cot else "no_cot"
    single = results["mrg"].get(headline_task("report"), {}).get(mode, {})
    ground = results["grounding"].get(headline_task("box"), {})
    vqa = results["vqa"].get(headline_task("answer"), {})
    return dict(zip(SIX[:4], mrg_values(single, SIX[:4]))) | {"mIoU": ground.get("mIoU"), "VQA BLEU-1": vqa.get("BLEU-1")}


SIX = ["mF1-14", "MF1-14", "BLEU-4", "ROUGE-L", "mIoU", "VQA BLEU-1"]


def test_datasets(results: dict) -> dict[str, set[str]]:
    return {kind: set(results.get("datasets", {}).get(kind, [])) for kind in RESULT_GROUPS.values()}


def section(title: str, header: Sequence[str], rows: list, *after: str) -> list[str]:
    return ["", f"## {title}", "", markdown_table(header, rows), *after] if rows else []


def table1(results: dict, mode: str, paper: dict, paper_mrg: bool) -> list[str]:
    cols = paper["table1"]["columns"]
    single = results["mrg"].get(headline_task("report"), {})
    if mode not in single:
        return []
    rows = [[f"this run ({single[mode]['samples']} images, {mode.replace('_', ' ')})",
             *map(pct, mrg_values(single[mode], cols))]]
    if paper_mrg:
        rows += [[name, *map(paper_pct, vals)] for name, vals in paper["table1"]["rows"].items()]
    return section("Table 1: report generation, single image", ["test set", *cols], rows)


def table2(results: dict, mode: str, paper: dict, paper_mrg: bool) -> list[str]:
    rows = []
    for scenario in report_scenarios():
        s = results["mrg"].get(scenario, {}).get(mode)
        if s is None:
            continue
        ours = " / ".join(pct(v) for v in mrg_values(s, ["mF1-14", "MF1-14"]))
        peers = "; ".join(f"{k} {paper_pct(v[0])} / {paper_pct(v[1])}" for k, v in paper["table2"][scenario].items())
        rows.append([scenario.replace("_", "-"), ours, pct(s["hallucinated_comparison_rate"]),
                     pct(s["reference_comparison_rate"])] + ([peers] if paper_mrg else []))
    header = ["scenario", "this run mF1-14 / MF1-14", "comparison in generated", "in references"] + \
        (["paper"] if paper_mrg else [])
    return section("Table 2: report-generation scenarios", header, rows,
                   "", "Comparison: the share of reports that speak of a prior study or a change. Only multi-study "
                       "has a prior to compare with; elsewhere it is hallucinated (references may carry it too, as "
                       "MIMIC-CXR's do).")


def table3(results: dict, paper: dict, paper_grounding: bool) -> list[str]:
    g = results["grounding"].get(headline_task("box"))
    if not g:
        return []
    rows = [[f"this run ({g['samples']} samples)", pct(g["acc@0.5"]), pct(g["mIoU"])]]
    if paper_grounding:
        rows += [[k, paper_pct(v[0]), paper_pct(v[1])] for k, v in paper["table3"].items()]
    return section("Table 3: phrase grounding", ["model", "accuracy (IoU >= 0.5)", "mIoU"], rows)


def grounded_reports_table(results: dict) -> list[str]:
    rows = []
    for task, g in results.get("grounded_reports", {}).items():
        rows.append([f"{task.replace('_', '-')} ({g['mode']})", g["reports"], g["sentences"], pct(g["box_rate"]),
                     pct(g["acc@0.5"]), pct(g["mIoU"]), f"{g['findings_boxed']} of {g['findings']} ({pct(g['finding_coverage'])})"])
    if not rows:
        return []
    return section("Grounded reports: each sentence stating a present finding, boxed by the model",
                   ["task", "graded reports", "finding sentences", "with a box", "accuracy (IoU >= 0.5)", "mIoU",
                    "true findings with a boxed sentence"], rows,
                   "", "Against the ground-truth box of the finding the sentence states, on the image it was grounded "
                       "on; a sentence answered without a box counts as IoU 0. Sentences about findings the image's "
                       "ground truth does not hold, and reports of images without finding boxes, are counted in "
                       "metrics.json (grounded_reports).")


def table4(results: dict, paper: dict, datasets: dict[str, set[str]]) -> list[str]:
    rows = []
    for task, v in results["vqa"].items():
        rows.append([f"this run: {task} ({v['samples']} samples)", pct(v["accuracy"]), pct(v["recall"]), pct(v["BLEU-1"])])
        for dataset, d in results.get("vqa_by_dataset", {}).get(task, {}).items():
            rows.append([f"this run: {task} on {dataset} ({d['samples']} samples)", pct(d["accuracy"]),
                         pct(d["recall"]), pct(d["BLEU-1"])])
    for dataset in paper["test_sets"]["vqa"]:
        if dataset in datasets["vqa"]:
            rows += [[f"{k} ({dataset})", *map(paper_pct, vals)] for k, vals in paper["table4"][dataset].items()]
    return section("Table 4: VQA", ["model", "accuracy", "recall", "BLEU-1"], rows)


def tables5_and_7(results: dict, exp: Experiment, mode: str, paper: dict, paper_mrg: bool) -> list[str]:
    """Table 5 (this run with and without CoT) and Table 7 (this run's sampling strategy)."""
    single = results["mrg"].get(headline_task("report"), {})
    h = headline(results, exp)
    rows = []
    for m in ("cot", "no_cot"):
        if m in single:
            vals = mrg_values(single[m], SIX[:4]) + ([h["mIoU"], h["VQA BLEU-1"]] if m == mode else [None, None])
            rows.append([exp.name, "yes" if m == "cot" else "no", " / ".join(map(pct, vals))])
    if not rows:
        return []
    if paper_mrg:
        rows += [[f"paper {r['run']} ({r['training']})", "yes" if r["cot"] else "no",
                  " / ".join(map(paper_pct, r["result"]))] for r in paper["table5"]]
    strategy_rows = [[f"this run ({exp.data.mixture.strategy})", " / ".join(pct(h[k]) for k in SIX)]]
    if paper_mrg:
        strategy_rows += [[f"paper {k}", " / ".join(map(paper_pct, v))] for k, v in paper["table7"].items()]
    return (section("Table 5: ablation row", ["run", "test CoT", " / ".join(SIX)], rows)
            + section("Table 7: sampling strategy row", ["strategy", " / ".join(SIX)], strategy_rows))


def intervals(results: dict, exp: Experiment) -> list[str]:
    rows = []
    for scenario, by_mode in results["mrg"].items():
        for m, s in by_mode.items():
            for name, (lo, hi) in s["ci"].items():
                rows.append([f"{scenario} ({m})", name, pct(mrg_values(s, [name])[0]), f"{pct(lo)} - {pct(hi)}"])
    for kind in ("grounding", "grounded_reports", "vqa"):
        for task, s in results.get(kind, {}).items():
            for name, (lo, hi) in s["ci"].items():
                rows.append([task, name, pct(s[name]), f"{pct(lo)} - {pct(hi)}"])
    return section(f"95% bootstrap intervals ({exp.eval.bootstrap_samples} resamples of the test samples)",
                   ["task", "metric", "value", "interval"], rows)


def baselines_and_counts(results: dict) -> list[str]:
    rows = []
    for task, b in results["baselines"].items():
        shown = {k: v for k, v in b.items() if k in ("mF1-14", "MF1-14", "mIoU", "acc@0.5", "accuracy")}
        rows.append([task, b["what"], ", ".join(f"{k} {pct(v)}" for k, v in shown.items())])
    counts = [[k, v["samples"], v["errors"]] for k, v in results["counts"].items()]
    return (section("Baselines that ignore the image", ["task", "baseline", "scores"], rows)
            + ["", "## Samples", "", markdown_table(["task", "samples", "could not be run"], counts)])


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
    out += table1(results, mode, paper, paper_mrg)
    out += table2(results, mode, paper, paper_mrg)
    out += table3(results, paper, paper_grounding)
    out += grounded_reports_table(results)
    out += table4(results, paper, datasets)
    out += tables5_and_7(results, exp, mode, paper, paper_mrg)
    out += intervals(results, exp)
    out += baselines_and_counts(results)
    return "\n".join(out) + "\n"
