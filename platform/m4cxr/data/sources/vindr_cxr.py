"""VinDr-CXR: disease classification and the box tasks (DATASETS.md section 4).

annotations/annotations_{train,test}.csv: image_id, rad_id (any capitalisation), class_name,
x_min, y_min, x_max, y_max (pixels of the DICOM; empty for "No finding"). Boxes of one finding in
one image, from all readers, are merged when they overlap by more than 50% (the paper's rule).
annotations/image_labels_{train,test}.csv: 0/1 columns per label, three readers per train image
(a label is present when most readers mark it), one consensus row per test image.
Images are {train,test}/<image_id>.dicom.
"""

from __future__ import annotations

from collections import defaultdict

from m4cxr.boxes import merge_overlapping
from m4cxr.data.sources.common import (
    Collector, classification_sample, detection_samples, find_file, stream_table,
)

DATASET = "vindr_cxr"
BOX_CLASSES = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
               "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
               "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis")
LABELS = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
          "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
          "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
          "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
          "Other disease")
TASKS = ("finding_grounding", "grounded_finding", "abnormality_detection", "multi_finding_grounding")


def read_boxes(c: Collector, split: str) -> dict[str, dict[str, list]]:
    table = stream_table(find_file(c.root / "annotations", f"annotations_{split}.csv"))
    image, name = table.column("image_id"), table.column("class_name")
    coords = [table.column(k) for k in ("x_min", "y_min", "x_max", "y_max")]
    found: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for row in table.rows:
        record = f"{table.path.name} line {row['line']}"
        finding = row[name]
        by_finding = found[row[image]]  # made here, so that an image with no finding is kept too
        if finding.lower() == "no finding":
            continue
        try:
            if finding not in BOX_CLASSES:
                raise ValueError(f"class_name {finding!r} is not one of the 14 box classes")
            x1, y1, x2, y2 = (float(row[col]) for col in coords)
            if x2 <= x1 or y2 <= y1:
                raise ValueError(f"empty box ({x1}, {y1}, {x2}, {y2})")
        except ValueError as err:
            c.skip(record, str(err))
            continue
        by_finding[finding].append((x1, y1, x2, y2))
    return {img: {k: merge_overlapping(v, 0.5) for k, v in by.items()} for img, by in found.items()}


def read_labels(c: Collector, split: str) -> dict[str, dict[str, int]]:
    table = stream_table(find_file(c.root / "annotations", f"image_labels_{split}.csv"))
    image = table.column("image_id")
    cols = {label: table.column(label, "Other diseases" if label == "Other disease" else label) for label in LABELS}
    votes: dict[str, list[dict[str, int]]] = defaultdict(list)
    for row in table.rows:
        try:
            votes[row[image]].append({label: int(float(row[col])) for label, col in cols.items()})
        except ValueError as err:
            c.skip(f"{table.path.name} line {row['line']}", f"label values must be 0 or 1: {err}")
    return {img: {label: int(2 * sum(v[label] for v in rows) > len(rows)) for label in LABELS}
            for img, rows in votes.items()}


def read(c: Collector) -> None:
    for split in ("train", "test"):
        boxes, labels = read_boxes(c, split), read_labels(c, split)
        for image_name in sorted(set(boxes) | set(labels)):
            path = c.root / split / f"{image_name}.dicom"
            if not path.exists():
                c.skip(f"{split}/{image_name}.dicom", "image file missing")
                continue
            patient = f"{DATASET}_{image_name}"
            image = c.image(f"{DATASET}_{image_name}", path, patient=patient, split=split)
            common = dict(split=split, patient=patient)
            if image_name in labels:
                classification_sample(c, image, labels[image_name], LABELS, **common)
            if image_name in boxes:
                try:
                    detection_samples(c, image, boxes[image_name], BOX_CLASSES, TASKS, **common)
                except ValueError as err:
                    c.skip(f"{split}/{image_name}.dicom", str(err))
