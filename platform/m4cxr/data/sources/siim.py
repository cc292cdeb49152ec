"""SIIM-ACR Pneumothorax: classification and pneumothorax grounding (DATASETS.md section 8).

The RLE file (train-rle.csv, stage_2_train.csv, ...; columns ImageId and EncodedPixels, header
names stripped) has one row per pneumothorax instance, "-1" for none; the instances of an image
are united. RLE runs are over the column-major flattened mask; both the relative variant (each
start counts from the previous run's end) and the absolute one are read: a file whose runs all
increase without overlap is absolute (1-based). Masks become one box per connected region, the
paper's rule. DICOMs (<ImageId>.dcm) lie anywhere below the folder. There is no official
validation split: every image is a training image.
"""

from __future__ import annotations

import numpy as np

from m4cxr.boxes import mask_to_boxes
from m4cxr.data.sources.common import (
    Collector, SourceError, classification_sample, detection_samples, find_file, stream_table,
)

DATASET = "siim"
TASKS = ("finding_grounding", "grounded_finding", "abnormality_detection")


def runs(encoded: str) -> list[tuple[int, int]]:
    values = [int(v) for v in encoded.split()]
    if len(values) % 2:
        raise ValueError("an odd number of RLE values")
    return list(zip(values[::2], values[1::2]))


def is_absolute(pairs: list[tuple[int, int]]) -> bool:
    return all(s2 >= s1 + n1 for (s1, n1), (s2, _) in zip(pairs, pairs[1:]))


def decode(pairs: list[tuple[int, int]], width: int, height: int, absolute: bool) -> np.ndarray:
    flat = np.zeros(width * height, dtype=bool)
    position = 0
    for start, length in pairs:
        position = start - 1 if absolute else position + start
        if position < 0 or length <= 0 or position + length > flat.size:
            raise ValueError(f"RLE run ({start}, {length}) is outside the {width} x {height} mask")
        flat[position:position + length] = True
        if not absolute:
            position += length
    return flat.reshape(width, height).T  # column-major


def read(c: Collector) -> None:
    path = find_file(c.root, "train-rle.csv", "stage_2_train.csv", "siim-pneumothorax-train-rle.csv")
    table = stream_table(path)
    image_col, rle_col = table.column("ImageId"), table.column("EncodedPixels")
    dicoms = {p.stem: p for p in c.root.rglob("*.dcm")}
    if not dicoms:
        raise SourceError(f"{c.root}: no .dcm images below this folder")
    encoded: dict[str, list] = {}
    for row in table.rows:
        value = row[rle_col].strip()
        try:
            pairs = None if value == "-1" else runs(value)
            encoded.setdefault(row[image_col], []).append(pairs)
        except ValueError as err:
            c.skip(f"{path.name} line {row['line']}", f"malformed EncodedPixels: {err}")
    multi = [p for rows in encoded.values() for p in rows if p and len(p) > 1]
    absolute = bool(multi) and all(is_absolute(p) for p in multi)
    c.note(f"{path.name}: {'absolute' if absolute else 'relative'} RLE")
    for name, instances in sorted(encoded.items()):
        if name not in dicoms:
            c.skip(name, f"no {name}.dcm below {c.root}")
            continue
        patient = f"{DATASET}_{name}"
        image = c.image(patient, dicoms[name], patient=patient, split="train")
        try:
            width, height = c.size(image)
            mask = np.zeros((height, width), dtype=bool)
            for pairs in instances:
                if pairs:
                    mask |= decode(pairs, width, height, absolute)
        except ValueError as err:
            c.skip(name, str(err))
            continue
        boxes = mask_to_boxes(mask)
        common = dict(split="train", patient=patient)
        classification_sample(c, image, {"Pneumothorax": int(bool(boxes))}, ["Pneumothorax"], **common)
        detection_samples(c, image, {"Pneumothorax": boxes}, ["Pneumothorax"], TASKS, **common)
