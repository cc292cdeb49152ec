"""Agreement of the rule-based report labeler with expert labels on real radiology reports, and
its speed on one core.

    python benchmarks/labeler_agreement.py --gold ../shared/data/real/iu_reports_dev/reports_with_gold.csv

The gold file holds de-identified Open-i (Indiana University) chest X-ray reports (`uid`,
`findings`, `impression`) with NegBio's gold labels (`gold_<class>`: 1 present, 0 absent). The
labeler reads findings and impression together. Eight observations are shared with CheXpert's
(Effusion is Pleural Effusion, normal is No Finding); each is scored as positive-only (the
labeler's 1 against the gold 1) and uncertain-as-positive (its 1 or -1).

The reports are split by a hash of their uid into a tuning part (about 2/3) and a held-out part
(about 1/3): rules are tuned on the first only, so the second shows over-fitting.

Writes benchmarks/results/labeler_agreement.json and the packaged figures that evaluation pages
quote (platform/m4cxr/resources/labeler_agreement.json: figures only, never report text), and
prints Markdown tables for RESULTS.md. `--errors OBS` prints the tuning part's disagreements on
one observation instead of writing anything.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from m4cxr.labeler import label_report, label_reports  # noqa: E402

# gold column -> the labeler's observation
SHARED = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
          "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation",
          "Edema": "Edema", "normal": "No Finding"}
RESULTS = ROOT / "benchmarks" / "results" / "labeler_agreement.json"
PACKAGED = ROOT / "platform" / "m4cxr" / "resources" / "labeler_agreement.json"


def read_gold(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"--gold: {path} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"uid", "findings", "impression"} | {f"gold_{c}" for c in SHARED}
    missing = need - set(rows[0] if rows else [])
    if missing:
        raise SystemExit(f"--gold: {path} lacks the columns {sorted(missing)}")
    return [{"uid": r["uid"], "report": report_text(r), "gold": {obs: int(r[f"gold_{c}"]) for c, obs in SHARED.items()}}
            for r in rows]


def report_text(row: dict) -> str:
    """Findings then impression, each its own paragraph, as a full report reads."""
    return "\n".join(part.strip() for part in (row["findings"], row["impression"]) if part.strip())


def is_held_out(uid: str) -> bool:
    return hashlib.sha256(uid.encode()).digest()[0] % 3 == 0


def f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def agreement(rows: list[dict], predicted: list[dict], positive: tuple[int, ...]) -> dict:
    """Per observation TP/FP/FN and F1, micro (counts pooled) and macro (F1s averaged)."""
    per = {}
    for obs in SHARED.values():
        tp = fp = fn = 0
        for row, labels in zip(rows, predicted):
            said, truth = labels.get(obs) in positive, row["gold"][obs] == 1
            tp += said and truth
            fp += said and not truth
            fn += truth and not said
        per[obs] = {"f1": round(f1(tp, fp, fn), 4), "tp": tp, "fp": fp, "fn": fn}
    pooled = [sum(v[k] for v in per.values()) for k in ("tp", "fp", "fn")]
    return {"per_observation": per, "micro_f1": round(f1(*pooled), 4),
            "macro_f1": round(sum(v["f1"] for v in per.values()) / len(per), 4)}


def speed_on_one_core(reports: list[str], repeats: int = 3) -> float:
    """Reports per second, best of `repeats` passes, with the process pinned to one CPU."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    label_report("warm the phrase patterns up.")
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        label_reports(reports)
        best = min(best, time.perf_counter() - start)
    return len(reports) / best


def table(parts: dict, key: str) -> str:
    names = list(parts)
    lines = ["| observation | " + " | ".join(f"{n} F1 (TP/FP/FN)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for obs in SHARED.values():
        cells = [f"{p[key]['per_observation'][obs]['f1']:.2f} "
                 f"({p[key]['per_observation'][obs]['tp']}/{p[key]['per_observation'][obs]['fp']}/"
                 f"{p[key]['per_observation'][obs]['fn']})" for p in parts.values()]
        lines.append(f"| {obs} | " + " | ".join(cells) + " |")
    lines.append("| **micro** | " + " | ".join(f"**{p[key]['micro_f1']:.3f}**" for p in parts.values()) + " |")
    lines.append("| macro | " + " | ".join(f"{p[key]['macro_f1']:.3f}" for p in parts.values()) + " |")
    return "\n".join(lines)


def print_errors(rows: list[dict], predicted: list[dict], obs: str) -> None:
    for row, labels in zip(rows, predicted):
        said, truth = labels.get(obs), row["gold"][obs]
        if (said == 1) != (truth == 1):
            print(f"--- uid {row['uid']}: gold {truth}, labeler {said}\n{row['report']}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gold", type=Path, required=True, help="reports_with_gold.csv")
    parser.add_argument("--errors", metavar="OBS", choices=list(SHARED.values()),
                        help="print the tuning part's disagreements on OBS; write nothing")
    args = parser.parse_args()

    rows = read_gold(args.gold)
    predicted = label_reports([r["report"] for r in rows])
    tune = [i for i, r in enumerate(rows) if not is_held_out(r["uid"])]
    held = [i for i, r in enumerate(rows) if is_held_out(r["uid"])]
    if args.errors:
        print_errors([rows[i] for i in tune], [predicted[i] for i in tune], args.errors)
        return

    parts = {}
    for name, index in (("all", range(len(rows))), ("tune", tune), ("held-out", held)):
        chosen_rows, chosen_labels = [rows[i] for i in index], [predicted[i] for i in index]
        parts[name] = {"reports": len(chosen_rows),
                       "positive_only": agreement(chosen_rows, chosen_labels, (1,)),
                       "uncertain_as_positive": agreement(chosen_rows, chosen_labels, (1, -1))}
    speed = speed_on_one_core([r["report"] for r in rows])

    result = {
        "labeler": "rule-based CheXpert-14 labeler (m4cxr.labeler.rules)",
        "gold": "NegBio's expert labels of Open-i (IU X-ray) reports, development set",
        "observations": dict(SHARED),
        "split": "held-out = sha256(uid)[0] % 3 == 0",
        "parts": parts,
        "reports_per_second_one_core": round(speed, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    packaged = {"labeler": result["labeler"], "gold": result["gold"], "reports": parts["all"]["reports"],
                "micro_f1": parts["all"]["positive_only"]["micro_f1"],
                "held_out_micro_f1": parts["held-out"]["positive_only"]["micro_f1"],
                "per_observation_f1": {k: v["f1"] for k, v in parts["all"]["positive_only"]["per_observation"].items()},
                "date": result["date"], "benchmark": "benchmarks/labeler_agreement.py"}
    PACKAGED.write_text(json.dumps(packaged, indent=2) + "\n")

    sizes = ", ".join(f"{n} {p['reports']}" for n, p in parts.items())
    print(f"reports: {sizes}\n")
    print("Positive only (labeler 1 = gold 1):\n")
    print(table(parts, "positive_only") + "\n")
    print("Uncertain as positive (labeler 1 or -1 = gold 1):\n")
    print(table(parts, "uncertain_as_positive") + "\n")
    print(f"speed: {speed:,.0f} reports/s on one core")
    print(f"wrote {RESULTS.relative_to(ROOT)} and {PACKAGED.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
