"""Counts of a corpus and its leakage checks: no patient in two splits, and no MS-CXR test image
in any training sample (the phrase-grounding test set must be unseen). Files are read a batch
of rows at a time."""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from m4cxr.data.schema import samples_path
from m4cxr.tasks import max_images, report_scenarios as report_tasks, takes_prior_study

MS_CXR = "ms_cxr"


BATCH_ROWS = 65_536  # rows read at a time: the counts do not hold a corpus's columns in memory


def batches(path: Path, columns: list[str], where=None):
    """One samples file's `columns` (the rows matching `where`), a batch at a time."""
    return pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns) if where is None else \
        ds.dataset(path).to_batches(columns=columns, filter=where, batch_size=BATCH_ROWS)


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
    scenarios: dict = defaultdict(lambda: defaultdict(int))
    with_ms_cxr = []  # the files with MS-CXR samples: only there are its test images
    for path in files:
        for (key, split), n in report_scenarios(path).items():
            scenarios[key][split] += n
        has_ms_cxr = False
        for batch in batches(path, ["task", "dataset", "split", "patient_id"]):
            table = pa.Table.from_batches([batch])
            # groups in the order they first appear (use_threads=False), as a row-by-row count would add them
            grouped = table.group_by(["task", "dataset", "split"], use_threads=False).aggregate([("task", "count")])
            for task, dataset, split, n in zip(*(grouped.column(c).to_pylist()
                                                 for c in ("task", "dataset", "split", "task_count"))):
                tasks[task][split] += n
                datasets[dataset][split] += n
                pairs[f"{task}/{dataset}"][split] += n
            for split, patient in zip(*(table.group_by(["split", "patient_id"], use_threads=False).aggregate([])
                                        .column(c).to_pylist() for c in ("split", "patient_id"))):
                patients[split].add(patient)
            total += table.num_rows
            has_ms_cxr = has_ms_cxr or bool(pc.any(pc.equal(table.column("dataset"), MS_CXR)).as_py())
        if has_ms_cxr:
            with_ms_cxr.append(path)
    ms_cxr_test = set().union(*(ms_cxr_test_images(path) for path in with_ms_cxr))
    # every file's training samples: MS-CXR's test images must be in none, whichever dataset's
    leaked_images = set().union(*(training_images_among(path, ms_cxr_test) for path in files))
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
        "report_scenarios": as_dict(scenarios),
        "leakage": {"patients_in_several_splits": len(leaked), "examples": leaked[:10],
                    "ms_cxr_test_images_in_training": len(leaked_images),
                    "ms_cxr_examples": sorted(leaked_images)[:10]},
    }


def report_scenarios(path: Path) -> Counter:
    """(rule, split) -> report-generation samples of one samples file: multi-image by its number
    of images, multi-study by whether it has the prior study (the paper's rules,
    data/sources/mimic_cxr.py)."""
    out: Counter = Counter()
    several = [s for s in report_tasks() if max_images(s) > 1]
    for batch in batches(path, ["task", "split", "images"],  # only their images column
                         where=pc.field("task").isin(several)):
        images = batch.column("images")
        lengths = pc.list_value_length(images).to_pylist()
        roles = pc.struct_field(pc.list_flatten(images), "role")
        priors = np.bincount(pc.list_parent_indices(images).to_numpy(zero_copy_only=False),
                             weights=pc.equal(roles, "prior").to_numpy(zero_copy_only=False),
                             minlength=batch.num_rows)
        for task, split, length, prior in zip(batch.column("task").to_pylist(), batch.column("split").to_pylist(),
                                              lengths, priors):
            if takes_prior_study(task):
                out[(f"{task}, with the prior study" if prior else f"{task}, no prior study (test)", split)] += 1
            else:
                out[(f"{task}, {length} image(s)", split)] += 1
    return out


def ms_cxr_test_images(path: Path) -> set[str]:
    """The image ids of one samples file's MS-CXR test samples."""
    ids: set[str] = set()
    for batch in batches(path, ["images"], where=(pc.field("dataset") == MS_CXR) & (pc.field("split") == "test")):
        ids.update(pc.struct_field(pc.list_flatten(batch.column("images")), "image_id").to_pylist())
    return ids


def training_images_among(path: Path, candidates: set[str]) -> set[str]:
    """The ids in `candidates` that one samples file's training samples use."""
    found: set[str] = set()
    if not candidates:
        return found
    value_set = pa.array(sorted(candidates), type=pa.string())
    for batch in batches(path, ["images"], where=pc.field("split") == "train"):
        ids = pc.struct_field(pc.list_flatten(batch.column("images")), "image_id")
        found.update(pc.filter(ids, pc.is_in(ids, value_set=value_set)).to_pylist())
    return found


def report_leakage(leakage: dict) -> int:
    """Print the leakage checks (the failures to stderr, naming examples); 1 when one fails."""
    failures = []
    if leakage["patients_in_several_splits"]:
        failures.append(f"{leakage['patients_in_several_splits']} patient(s) in several splits, e.g. "
                        f"{', '.join(leakage['examples'][:5])}")
    if leakage["ms_cxr_test_images_in_training"]:
        failures.append(f"{leakage['ms_cxr_test_images_in_training']} MS-CXR test image(s) in training samples, e.g. "
                        f"{', '.join(leakage['ms_cxr_examples'][:5])}")
    print(f"  leakage: {leakage['patients_in_several_splits']} patient(s) in several splits, "
          f"{leakage['ms_cxr_test_images_in_training']} MS-CXR test image(s) in training samples"
          + (" (FAIL)" if failures else " (ok)"))
    for failure in failures:
        print(f"  LEAKAGE: {failure}", file=sys.stderr)
    return 1 if failures else 0


def pair_counts(corpus_dir: str | Path, split: str = "train") -> dict[str, int]:
    """"task/dataset" -> number of samples in one split (what a mixture has at hand)."""
    stats = corpus_stats(corpus_dir)
    return {pair: by_split.get(split, 0) for pair, by_split in stats["pairs"].items()}
