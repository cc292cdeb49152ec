"""ChestX-ray14 (NIH): disease classification and finding grounding (DATASETS.md section 5).

Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv): Image Index, Finding Labels ("|"-separated),
Patient ID, ...; BBox_List_2017.csv: image, label, x, y, w, h (pixels of the 1024 x 1024 PNG; its
header does not match its rows, so it is read by position); train_val_list.txt and test_list.txt
are the official split. PNGs lie anywhere below the folder (images_001/images/...).

Finding grounding uses the boxed images (the finding asked about has its boxes) and the
"No Finding" images (a finding asked about is absent: "Not found."); images with a finding
but no box have no grounding sample.
"""

from __future__ import annotations

from collections import defaultdict

from m4cxr.data.sources.common import (
    Collector, SourceError, classification_sample, detection_samples, find_file, stream_table,
)

DATASET = "chestx_ray14"
LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
          "Infiltration", "Mass", "Nodule", "Pleural Thickening", "Pneumonia", "Pneumothorax")
BOX_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax")
BOX_NAMES = {"Infiltrate": "Infiltration"}  # the box list's spelling -> the label's


def label_name(raw: str) -> str:
    return BOX_NAMES.get(raw.strip(), raw.strip()).replace("_", " ")


def read_split_lists(c: Collector) -> dict[str, str]:
    split = {}
    for name, value in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
        path = find_file(c.root, name)
        split.update({line.strip(): value for line in path.read_text().splitlines() if line.strip()})
    return split


def read_boxes(c: Collector) -> dict[str, dict[str, list]]:
    path = find_file(c.root, "BBox_List_2017.csv", required=False)
    found: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    if path is None:
        c.note("no BBox_List_2017.csv: no boxed images")
        return found
    table = stream_table(path, names=["image", "label", "x", "y", "w", "h"])
    for row in table.rows:
        try:
            name = label_name(row["label"])
            if name not in BOX_LABELS:
                raise ValueError(f"box label {row['label']!r} is not one of {BOX_LABELS}")
            x, y, w, h = (float(row[k]) for k in "xywh")
            if w <= 0 or h <= 0:
                raise ValueError(f"empty box w={w} h={h}")
        except ValueError as err:
            c.skip(f"{path.name} line {row['line']}", str(err))
            continue
        found[row["image"]][name].append((x, y, x + w, y + h))
    return found


def read(c: Collector) -> None:
    entry = stream_table(find_file(c.root, "Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"))
    image_col, labels_col = entry.column("Image Index"), entry.column("Finding Labels")
    patient_col = entry.column("Patient ID")
    splits, boxes = read_split_lists(c), read_boxes(c)
    paths = {p.name: p for p in c.root.rglob("*.png")}
    if not paths:
        raise SourceError(f"{c.root}: no PNG images below this folder")
    for row in entry.rows:
        record, name = f"{entry.path.name} line {row['line']}", row[image_col]
        try:
            raw = [label_name(v) for v in row[labels_col].split("|") if v.strip()]
            unknown = [v for v in raw if v not in LABELS and v != "No Finding"]
            if not raw or unknown:
                raise ValueError(f"Finding Labels {row[labels_col]!r}: unknown or missing labels {unknown}")
            if name not in splits:
                raise ValueError(f"{name} is in neither train_val_list.txt nor test_list.txt")
            if name not in paths:
                raise ValueError(f"image {name} not found below {c.root}")
        except ValueError as err:
            c.skip(record, str(err))
            continue
        split, patient = splits[name], f"{DATASET}_{row[patient_col].lstrip('0') or '0'}"
        image = c.image(f"{DATASET}_{name.rsplit('.', 1)[0]}", paths[name], patient=patient, split=split,
                        view=row.get("View Position", ""))
        common = dict(split=split, patient=patient)
        labels = {label: int(label in raw) for label in LABELS}
        classification_sample(c, image, labels, LABELS, **common)
        if name in boxes:
            unboxed = [label for label in BOX_LABELS if labels[label] and label not in boxes[name]]
            tasks = ["finding_grounding"] + ([] if unboxed else ["multi_finding_grounding"])
            if unboxed:
                c.exclude("multi-finding grounding: a present finding has no box")
            detection_samples(c, image, boxes[name], BOX_LABELS, tasks, **common)
        elif raw == ["No Finding"]:
            detection_samples(c, image, {}, BOX_LABELS, ["finding_grounding", "multi_finding_grounding"], **common)
