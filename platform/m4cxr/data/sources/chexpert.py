"""CheXpert (v1.0 and v1.0-small): disease classification (DATASETS.md section 14).

train.csv and valid.csv: Path (starting with the dataset's folder name, e.g.
CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg), Sex, Age, Frontal/Lateral, AP/PA
and the 14 labels (1 / 0 / -1 / blank; uncertain counts as absent). The patient and study come
from the path. train.csv is the training split, valid.csv the validation split.
"""

from __future__ import annotations

from pathlib import Path

from m4cxr.data.sources.common import (
    Collector, chexpert_value, classification_sample, find_file, stream_table,
)
from m4cxr.tasks import chexbert_labels, cot_candidates

DATASET = "chexpert"


def resolve(root: Path, rel: str) -> Path:
    """Path values start with the dataset folder: try it beside the folder, inside it, then without it."""
    parts = Path(rel).parts
    for candidate in (root.parent / rel, root / rel, root.joinpath(*parts[1:]) if len(parts) > 1 else root / rel):
        if candidate.exists():
            return candidate
    return root / rel


def read(c: Collector) -> None:
    for split, name in (("train", "train.csv"), ("validate", "valid.csv")):
        path = find_file(c.root, name, required=split != "validate")
        if path is None:
            c.note("no valid.csv: the validate split is empty")
            continue
        table = stream_table(path)
        path_col = table.column("Path")
        names = {n: table.column(n) for n in chexbert_labels()}
        for row in table.rows:
            record = f"{name} line {row['line']}"
            try:
                parts = Path(row[path_col]).parts
                patient_part = next(p for p in parts if p.startswith("patient"))
                study_part = parts[parts.index(patient_part) + 1]
                labels = {n: chexpert_value(row[col], record) for n, col in names.items()}
                image_path = resolve(c.root, row[path_col])
                if not image_path.exists():
                    raise ValueError(f"no image {row[path_col]}")
            except (ValueError, StopIteration, IndexError) as err:
                c.skip(record, str(err) or f"no patient folder in Path {row[path_col]!r}")
                continue
            patient = f"{DATASET}_{patient_part}"
            image = c.image(f"{DATASET}_{patient_part}_{study_part}_{Path(row[path_col]).stem}", image_path,
                            patient=patient, study=f"{patient}_{study_part}", split=split)
            classification_sample(c, image, {k: v for k, v in labels.items() if v is not None}, cot_candidates(),
                                  split=split, patient=patient, study=f"{patient}_{study_part}")
