"""What a run's metrics.jsonl says about its restarts: the surviving lineage and what each
restart cost.

Every attempt of a run appends its steps to metrics.jsonl. A restart shows as a row whose step
is not above the row before it: the attempt resumed from the checkpoint of step `resumed_from`
and the earlier attempt's later rows are trained again. The lineage is the rows the final
model descends from; it is complete when its steps are 1..N and each step's stream positions
start where the previous step's end ([first_position, position), from 0 to N x global batch).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def surviving_rows(rows: list[dict]) -> list[dict]:
    """The rows of the lineage: a later attempt's row replaces the earlier ones of its step and
    after."""
    kept: list[dict] = []
    for row in rows:
        while kept and kept[-1]["step"] >= row["step"]:
            kept.pop()
        kept.append(row)
    return kept


def lineage_problems(rows: list[dict], steps: int, global_batch: int) -> list[str]:
    """Why the lineage is not every stream position of `steps` steps trained once, in order
    (an empty list when it is)."""
    kept = surviving_rows(rows)
    problems = []
    if [r["step"] for r in kept] != list(range(1, steps + 1)):
        problems.append(f"steps {[r['step'] for r in kept]} instead of 1..{steps}")
    end = 0
    for r in kept:
        if r["first_position"] != end or r["position"] != r["first_position"] + global_batch:
            problems.append(f"step {r['step']} trained positions [{r['first_position']}, {r['position']}) "
                            f"after the lineage reached {end}")
        end = r["position"]
    if end != steps * global_batch:
        problems.append(f"the lineage ends at position {end}, not {steps * global_batch}")
    return problems


def attempts(rows: list[dict]) -> list[list[dict]]:
    """The rows split by attempt: a new one starts where the step does not go up or
    `resumed_from` changes."""
    out: list[list[dict]] = []
    for i, row in enumerate(rows):
        if not out or row["step"] <= rows[i - 1]["step"] or row["resumed_from"] != rows[i - 1]["resumed_from"]:
            out.append([])
        out[-1].append(row)
    return out


def restart_costs(rows: list[dict]) -> list[dict]:
    """Per restart: the checkpoint step it resumed from, the steps trained again, and the
    seconds lost: from the restored step's row to the first row after it, less one ordinary
    step (the time a run without the failure would have spent there)."""
    times = [b["time"] - a["time"] for a, b in zip(rows, rows[1:]) if b["step"] == a["step"] + 1]
    step_s = statistics.median(times) if times else 0.0
    costs, earlier = [], []
    for previous, attempt in zip(runs := attempts(rows), runs[1:]):
        earlier += previous
        row, resumed = attempt[0], attempt[0]["step"] - 1
        before = [r for r in earlier if r["step"] == resumed]
        since = before[-1]["time"] if before else previous[-1]["time"]
        costs.append({"resumed_from_step": resumed, "steps_trained_again": max(0, previous[-1]["step"] - resumed),
                      "seconds_lost": round(max(0.0, row["time"] - since - step_s), 1)})
    return costs
