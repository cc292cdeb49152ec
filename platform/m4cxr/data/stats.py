"""Counts of a corpus and its leakage check (no patient in two splits)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from m4cxr.data.schema import samples_path


def corpus_stats(corpus_dir: str | Path) -> dict:
    """Samples per task / dataset / pair and split, patients per split, and the leakage check."""
    files = sorted(samples_path(corpus_dir).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{corpus_dir}: no samples/*.parquet (is it a corpus folder?)")
    tasks: dict = defaultdict(lambda: defaultdict(int))
    datasets: dict = defaultdict(lambda: defaultdict(int))
    pairs: dict = defaultdict(lambda: defaultdict(int))
    patients: dict = defaultdict(set)
    total = 0
    for path in files:
        table = pq.read_table(path, columns=["task", "dataset", "split", "patient_id"])
        for task, dataset, split, patient in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            tasks[task][split] += 1
            datasets[dataset][split] += 1
            pairs[f"{task}/{dataset}"][split] += 1
            patients[split].add(patient)
            total += 1
    owners: dict = defaultdict(set)
    for split, ids in patients.items():
        for pid in ids:
            owners[pid].add(split)
    leaked = sorted(pid for pid, splits in owners.items() if len(splits) > 1)
    as_dict = lambda d: {k: dict(v) for k, v in sorted(d.items())}  # noqa: E731
    images = Path(corpus_dir) / "images.parquet"
    return {
        "samples": total,
        "images": pq.read_metadata(images).num_rows if images.exists() else 0,
        "tasks": as_dict(tasks),
        "datasets": as_dict(datasets),
        "pairs": as_dict(pairs),
        "patients": {split: len(ids) for split, ids in sorted(patients.items())},
        "leakage": {"patients_in_several_splits": len(leaked), "examples": leaked[:10]},
    }


def pair_counts(corpus_dir: str | Path, split: str = "train") -> dict[str, int]:
    """"task/dataset" -> number of samples in one split (what a mixture has at hand)."""
    stats = corpus_stats(corpus_dir)
    return {pair: by_split.get(split, 0) for pair, by_split in stats["pairs"].items()}
