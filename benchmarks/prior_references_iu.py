"""Removing references to prior studies from real reports: how many reports change, whether their
CheXpert-14 labels stay the same, what is left, and how fast.

    python benchmarks/prior_references_iu.py [CSV]

CSV (default /work/shared/data/real/iu_reports_dev/reports_with_gold.csv) holds de-identified
Open-i (Indiana University) chest X-ray reports (`uid`, `findings`, `impression`, ...). The report
text is findings then impression, each its own paragraph, as benchmarks/labeler_agreement.py
reads it: the labels are those of the whole report, and a sentence is judged against the rest of
the report it stands in.

The rewriter runs twice: with its label check (the default: a sentence whose rewrite would change
the labels is kept as written) and without it, which shows how often the rules alone would change
the labels. Writes benchmarks/results/prior_references_iu.json (counts, timing and twenty examples
chosen evenly over the changed reports) and benchmarks/results/prior_references_iu.md (a section for
RESULTS.md). `--residual` prints the sentences that still speak of a prior and `--label-changes` the
reports whose labels the rules alone would change, instead of writing anything.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from m4cxr.labeler import label_report  # noqa: E402
from m4cxr.labeler.prior_references import (  # noqa: E402
    PRIOR_REFERENCE, mentions_prior, remove_prior_references, split_sentences,
)

DEFAULT_CSV = Path("/work/shared/data/real/iu_reports_dev/reports_with_gold.csv")
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLES = 20


def read_reports(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"{path} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"uid", "findings", "impression"} <= set(rows[0]):
        raise SystemExit(f"{path} lacks the columns uid, findings, impression")
    return [{"uid": r["uid"], "report": report_text(r)} for r in rows]


def report_text(row: dict) -> str:
    """Findings then impression, each its own paragraph, as a full report reads."""
    return "\n".join(part.strip() for part in (row["findings"], row["impression"]) if part.strip())


def residual_sentences(text: str) -> list[str]:
    sentences, _ = split_sentences(text)
    return [s for s in sentences if PRIOR_REFERENCE.search(s)]


def measure(rows: list[dict]) -> tuple[dict, list[dict]]:
    labels = [label_report(r["report"]) for r in rows]
    start = time.process_time()
    guarded = [remove_prior_references(r["report"]) for r in rows]
    seconds = time.process_time() - start
    start = time.process_time()
    raw = [remove_prior_references(r["report"], check_labels=False) for r in rows]
    raw_seconds = time.process_time() - start

    changed = [i for i, g in enumerate(guarded) if g.changed_report]
    raw_changed = [i for i, g in enumerate(raw) if g.changed_report]
    raw_same = [i for i in raw_changed if label_report(raw[i].text) == labels[i]]
    figures = {
        "reports": len(rows),
        "mentioning_prior_before": sum(mentions_prior(r["report"]) for r in rows),
        "with_label_check": {
            "reports_changed": len(changed),
            "sentences_changed": sum(g.changed for g in guarded),
            "sentences_removed": sum(g.removed for g in guarded),
            "sentences_kept_for_labels": sum(g.kept_for_labels for g in guarded),
            "reports_with_a_sentence_kept_for_labels": sum(g.kept_for_labels > 0 for g in guarded),
            "labels_unchanged_in_changed_reports": sum(label_report(guarded[i].text) == labels[i] for i in changed),
            "mentioning_prior_after": sum(mentions_prior(g.text) for g in guarded),
            "ms_per_report": round(1000 * seconds / len(rows), 3),
        },
        "without_label_check": {
            "reports_changed": len(raw_changed),
            "sentences_changed": sum(g.changed for g in raw),
            "sentences_removed": sum(g.removed for g in raw),
            "labels_unchanged_in_changed_reports": len(raw_same),
            "labels_unchanged_share": round(len(raw_same) / max(1, len(raw_changed)), 4),
            "mentioning_prior_after": sum(mentions_prior(g.text) for g in raw),
            "ms_per_report": round(1000 * raw_seconds / len(rows), 3),
        },
        "machine": f"{platform.processor() or platform.machine()}, one core (CPU time), Python {platform.python_version()}",
    }
    step = max(1, len(changed) // EXAMPLES)
    examples = [{"uid": rows[i]["uid"], "before": rows[i]["report"], "after": guarded[i].text}
                for i in changed[::step][:EXAMPLES]]
    return figures, examples


def markdown(figures: dict, examples: list[dict], source: str) -> str:
    g, r = figures["with_label_check"], figures["without_label_check"]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " <br> ")

    lines = [
        "## Removing references to prior studies: real reports", "",
        f"`m4cxr.labeler.prior_references.remove_prior_references` over {figures['reports']:,} de-identified "
        f"Open-i (IU) reports ({source}; findings and impression together), by `benchmarks/prior_references_iu.py`. "
        "Labels are the rule labeler's CheXpert-14 labels of the whole report. With the label check, a sentence "
        "whose rewrite would change them is kept as written; without it, the rules alone decide.", "",
        "| | with label check | rules alone |", "|---|---:|---:|",
        f"| reports | {figures['reports']:,} | {figures['reports']:,} |",
        f"| reports mentioning a prior study before | {figures['mentioning_prior_before']:,} | "
        f"{figures['mentioning_prior_before']:,} |",
        f"| reports changed | {g['reports_changed']:,} | {r['reports_changed']:,} |",
        f"| sentences changed | {g['sentences_changed']:,} | {r['sentences_changed']:,} |",
        f"| of which removed whole | {g['sentences_removed']:,} | {r['sentences_removed']:,} |",
        f"| sentences kept for the labels | {g['sentences_kept_for_labels']:,} | - |",
        f"| changed reports with labels unchanged | {g['labels_unchanged_in_changed_reports']:,} of "
        f"{g['reports_changed']:,} | {r['labels_unchanged_in_changed_reports']:,} of {r['reports_changed']:,} "
        f"({100 * r['labels_unchanged_share']:.1f}%) |",
        f"| reports still mentioning a prior study after | {g['mentioning_prior_after']:,} | "
        f"{r['mentioning_prior_after']:,} |",
        f"| time per report | {g['ms_per_report']:.2f} ms | {r['ms_per_report']:.2f} ms |", "",
        f"Time on {figures['machine']}. Twenty rewritten reports, evenly over the changed ones:", "",
        "| uid | before | after |", "|---|---|---|",
    ]
    lines += [f"| {e['uid']} | {cell(e['before'])} | {cell(e['after'])} |" for e in examples]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", nargs="?", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--residual", action="store_true", help="print sentences still speaking of a prior")
    parser.add_argument("--label-changes", action="store_true", help="print reports whose labels the rules change")
    args = parser.parse_args()
    rows = read_reports(args.csv)

    if args.residual or args.label_changes:
        for r in rows:
            if args.residual:
                for s in residual_sentences(remove_prior_references(r["report"]).text):
                    print(r["uid"], "|", s)
            else:
                raw = remove_prior_references(r["report"], check_labels=False)
                before, after = label_report(r["report"]), label_report(raw.text)
                if raw.changed_report and before != after:
                    diff = {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                            if before.get(k) != after.get(k)}
                    print(r["uid"], diff, "\n  BEFORE:", r["report"], "\n  AFTER: ", raw.text)
        return

    figures, examples = measure(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prior_references_iu.json").write_text(
        json.dumps({"source": str(args.csv), **figures, "examples": examples}, indent=2) + "\n")
    (RESULTS / "prior_references_iu.md").write_text(markdown(figures, examples, args.csv.name))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
