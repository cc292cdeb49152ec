"""`data.prior_references: remove`: report targets without references to a prior study that the
model is not given.

The scenarios without a prior study (single-image, multi-image) train on reports that often
compare with one ("Stable moderate cardiomegaly", "No interval change"), as MIMIC-CXR's do; a
model trained on them writes comparisons with a study it never saw. With `remove`, their targets
are rewritten by labeler/prior_references.py, which keeps every CheXpert label of the report.
Multi-study targets, whose prompt holds the prior study, are left as they are.

The corpus keeps its reports as written: the rewrite happens as samples are streamed into
training (data/pipeline.py), so one corpus serves both settings, and `data stats` / `data
prepare` count what `remove` changes.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path

import pyarrow.compute as pc

from m4cxr.data.schema import samples_path
from m4cxr.labeler.prior_references import Rewrite, remove_prior_references
from m4cxr.tasks import report_scenarios, takes_prior_study

log = logging.getLogger(__name__)

# the report-generation tasks whose prompt holds no prior study
REWRITTEN_TASKS = tuple(t for t in report_scenarios() if not takes_prior_study(t))
PROGRESS_EVERY_S = 10.0


@lru_cache(maxsize=65_536)  # a study's report is the target of several samples
def rewrite(report: str) -> Rewrite:
    return remove_prior_references(report)


def without_prior_references(sample: dict) -> dict:
    """The sample with its report target (the report and the conversation's last answer)
    rewritten, where its task gives the model no prior study; other samples as they are."""
    if sample["task"] not in REWRITTEN_TASKS or not sample.get("report"):
        return sample
    turns = [dict(t) for t in sample["turns"]]
    if turns and turns[-1]["role"] == "assistant":
        turns[-1]["content"] = rewrite(turns[-1]["content"]).text
    return dict(sample, report=rewrite(sample["report"]).text, turns=turns)


def add_up(totals: dict, r: Rewrite) -> None:
    """Adds one rewrite to the counts `data stats`, `data prepare` and `remove-priors` report."""
    totals["changed"] += r.changed_report
    totals["sentences_changed"] += r.changed
    totals["sentences_removed"] += r.removed
    totals["sentences_kept_for_labels"] += r.kept_for_labels


def count_rewrites(corpus_dir: str | Path, split: str = "train") -> dict:
    """What `remove` changes in a split: report targets (samples) of the rewritten tasks, how many
    change, and their sentences rewritten, removed, and kept because the labels would change."""
    import pyarrow.dataset as ds

    counts = dict(targets=0, changed=0, sentences_changed=0, sentences_removed=0, sentences_kept_for_labels=0)
    path = samples_path(corpus_dir, split)
    if not path.is_file():
        return counts
    where = pc.field("task").isin(list(REWRITTEN_TASKS))
    started = last = time.time()
    for batch in ds.dataset(path).to_batches(columns=["report"], filter=where, batch_size=65_536):
        for report in batch.column("report").to_pylist():
            counts["targets"] += 1
            add_up(counts, rewrite(report or ""))
            if time.time() - last >= PROGRESS_EVERY_S:
                last = time.time()
                log.info("prior references: %d report targets read in %.0fs", counts["targets"], last - started)
    return counts


def describe(counts: dict) -> str:
    """One line for `data stats` and `data prepare`."""
    share = counts["changed"] / counts["targets"] if counts["targets"] else 0.0
    return (f"with data.prior_references=remove, {counts['changed']} of {counts['targets']} single-/multi-image "
            f"report targets ({share:.1%}) are rewritten: {counts['sentences_changed']} sentences changed, "
            f"{counts['sentences_removed']} of them removed; {counts['sentences_kept_for_labels']} kept because the "
            f"labels would change")


def rewrite_csv(in_path: str | Path, column: str, out_path: str | Path) -> dict:
    """`m4cxr data remove-priors`: every row of a CSV of reports, its `column` rewritten, the other
    columns as they are, and three columns of counts appended (prior_sentences_changed,
    prior_sentences_removed, prior_sentences_kept_for_labels); one output row per input row.
    Returns the totals."""
    import csv

    added = ["prior_sentences_changed", "prior_sentences_removed", "prior_sentences_kept_for_labels"]
    totals = dict(rows=0, empty=0, changed=0, sentences_changed=0, sentences_removed=0, sentences_kept_for_labels=0)
    started = last = time.time()
    with open(in_path, newline="", encoding="utf-8") as src:
        reader = csv.DictReader(src)
        if reader.fieldnames is None:
            raise ValueError(f"{in_path}: empty file, no header row")
        if column not in reader.fieldnames:
            raise ValueError(f"{in_path}: no column {column!r}; its columns are {reader.fieldnames}")
        clash = [c for c in added if c in reader.fieldnames]
        if clash:
            raise ValueError(f"{in_path}: already has the output's count columns {clash}")
        with open(out_path, "w", newline="", encoding="utf-8") as dst:
            writer = csv.DictWriter(dst, fieldnames=[*reader.fieldnames, *added])
            writer.writeheader()
            for line, row in enumerate(reader, start=2):
                if None in row:  # more cells than the header names: nothing is dropped silently
                    raise ValueError(f"{in_path}, line {line}: {len(row[None])} cells more than the header's columns")
                text = row[column] or ""
                r = remove_prior_references(text) if text.strip() else Rewrite(text, 0, 0, 0)
                totals["rows"] += 1
                totals["empty"] += not text.strip()
                add_up(totals, r)
                writer.writerow({**row, column: r.text, added[0]: r.changed, added[1]: r.removed,
                                 added[2]: r.kept_for_labels})
                if time.time() - last >= PROGRESS_EVERY_S:
                    last = time.time()
                    log.info("remove-priors: %d rows in %.0fs", totals["rows"], last - started)
    return totals
