"""Counts of a corpus and its leakage checks: no patient in two splits, and no MS-CXR test image
in any training sample (the phrase-grounding test set must be unseen)."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from m4cxr.data.schema import samples_path

MS_CXR = "ms_cxr"


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
    ms_cxr_test: set[str] = set()
    training_images: set[str] = set()
    scenarios: dict = defaultdict(lambda: defaultdict(int))
    for path in files:
        for key, split in report_scenarios(path):
            scenarios[key][split] += 1
        table = pq.read_table(path, columns=["task", "dataset", "split", "patient_id"])
        for task, dataset, split, patient in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            tasks[task][split] += 1
            datasets[dataset][split] += 1
            pairs[f"{task}/{dataset}"][split] += 1
            patients[split].add(patient)
            total += 1
        if pc.any(pc.equal(table.column("dataset"), MS_CXR)).as_py():  # only then are image ids needed
            ms_test, train = ms_cxr_test_and_training_images(path)
            ms_cxr_test |= ms_test
            training_images |= train
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
                    "ms_cxr_test_images_in_training": len(ms_cxr_test & training_images),
                    "ms_cxr_examples": sorted(ms_cxr_test & training_images)[:10]},
    }


def report_scenarios(path: Path) -> list[tuple[str, str]]:
    """(rule, split) of each report-generation sample of one samples file: multi-image by its
    number of images, multi-study by whether it has the prior study (the paper's rules,
    data/sources/mimic_cxr.py)."""
    table = pq.read_table(path, columns=["task", "split", "images"],
                          filters=[("task", "in", ["multi_image", "multi_study"])])  # only their images column
    out = []
    for task, split, images in zip(*(table.column(c).to_pylist() for c in ("task", "split", "images"))):
        if task == "multi_image":
            out.append((f"multi_image, {len(images)} image(s)", split))
        elif task == "multi_study":
            prior = sum(i["role"] == "prior" for i in images)
            out.append(("multi_study, with the prior study" if prior else "multi_study, no prior study (test)", split))
    return out


def ms_cxr_test_and_training_images(path: Path) -> tuple[set[str], set[str]]:
    """The image ids of one samples file's MS-CXR test samples, and those of its training samples."""
    table = pq.read_table(path, columns=["dataset", "split", "images"])
    ids = pc.struct_field(pc.list_flatten(table.column("images")), "image_id")
    parents = pc.list_parent_indices(table.column("images"))
    dataset, split = (pc.take(table.column(c), parents) for c in ("dataset", "split"))
    ms_test = pc.and_(pc.equal(dataset, MS_CXR), pc.equal(split, "test"))
    train = pc.equal(split, "train")
    as_set = lambda mask: set(pc.filter(ids, mask).to_pylist()) if len(ids) else set()  # noqa: E731
    return as_set(ms_test), as_set(train)


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
