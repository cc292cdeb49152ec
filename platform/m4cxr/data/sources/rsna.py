"""RSNA Pneumonia Detection: classification and pneumonia grounding (DATASETS.md section 9).

stage_2_train_labels.csv: patientId, x, y, width, height, Target (one row per box, pixels);
stage_2_detailed_class_info.csv: patientId, class. Only "Lung Opacity" (called pneumonia, after
You et al.) and "Normal" are used, the paper's rule. Images: stage_2_train_images/<patientId>.dcm.
"""

from __future__ import annotations

from m4cxr.data.sources.common import (
    Collector, classification_sample, detection_samples, find_file, stream_table,
)

DATASET = "rsna"
TASKS = ("finding_grounding", "grounded_finding", "abnormality_detection")
KEPT = {"Lung Opacity": True, "Normal": False}


def read(c: Collector) -> None:
    classes = stream_table(find_file(c.root, "stage_2_detailed_class_info.csv"))
    pid, cls = classes.column("patientId"), classes.column("class")
    kind = {row[pid]: row[cls] for row in classes.rows}
    labels = stream_table(find_file(c.root, "stage_2_train_labels.csv"))
    cols = {k: labels.column(k) for k in ("patientId", "x", "y", "width", "height", "Target")}
    boxes: dict[str, list] = {}
    for row in labels.rows:
        name = row[cols["patientId"]]
        try:
            if row[cols["Target"]] not in ("0", "1"):
                raise ValueError(f"Target {row[cols['Target']]!r} is not 0 or 1")
            image_boxes = boxes.setdefault(name, [])  # a Target=0 patient has none
            if row[cols["Target"]] == "1":
                x, y, w, h = (float(row[cols[k]]) for k in ("x", "y", "width", "height"))
                if w <= 0 or h <= 0:
                    raise ValueError(f"empty box w={w} h={h}")
                image_boxes.append((x, y, x + w, y + h))
        except ValueError as err:
            c.skip(f"{labels.path.name} line {row['line']}", str(err))
    folder = c.root / "stage_2_train_images"
    for name in sorted(boxes):
        if kind.get(name) not in KEPT:
            c.exclude(f"class {kind.get(name)!r} (only Lung Opacity and Normal are used)")
            continue
        if KEPT[kind[name]] != bool(boxes[name]):
            c.skip(name, f"class {kind[name]!r} disagrees with its {len(boxes[name])} box(es)")
            continue
        path = folder / f"{name}.dcm"
        if not path.exists():
            c.skip(name, f"no {path.relative_to(c.root)}")
            continue
        patient = f"{DATASET}_{name}"
        image = c.image(patient, path, patient=patient, split="train")
        common = dict(split="train", patient=patient)
        classification_sample(c, image, {"Pneumonia": int(bool(boxes[name]))}, ["Pneumonia"], **common)
        detection_samples(c, image, {"Pneumonia": boxes[name]}, ["Pneumonia"], TASKS, **common)
