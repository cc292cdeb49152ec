"""JSRT: nodule grounding (DATASETS.md section 7).

CLNDAT_EN.txt (tab-separated: file name, subtlety, size in mm, age, sex, x, y, malignant/benign,
location, diagnosis) lists the 154 nodule images; CNNDAT_EN.TXT the 93 without a nodule. The
images are headerless 2048 x 2048 .IMG files anywhere below the folder. A nodule circle (centre
x, y in pixels; diameter size_mm / 0.175 mm per pixel) becomes its enclosing box, the paper's
rule. JSRT has no official split: every image is a training image.
"""

from __future__ import annotations

import re

from m4cxr.boxes import circle_to_box
from m4cxr.data.images import JSRT_SIDE
from m4cxr.data.sources.common import Collector, detection_samples, find_file

DATASET = "jsrt"
PIXEL_MM = 0.175
TASKS = ("finding_grounding", "grounded_finding", "abnormality_detection")
NAME = re.compile(r"(JPC[LN]N\d{3})", re.IGNORECASE)


def read(c: Collector) -> None:
    paths = {p.stem.upper(): p for p in c.root.rglob("*") if p.suffix.upper() == ".IMG"}
    nodules: dict[str, tuple] = {}
    path = find_file(c.root, "CLNDAT_EN.txt", "CLNDAT_EN.TXT")
    for line_no, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        fields = [f.strip() for f in line.split("\t")]
        if not line.strip() or not NAME.match(fields[0]):
            continue  # a header or blank line
        try:
            name = NAME.match(fields[0]).group(1).upper()
            size_mm, x, y = float(fields[2]), float(fields[5]), float(fields[6])
            if size_mm <= 0 or not (0 <= x < JSRT_SIDE and 0 <= y < JSRT_SIDE):
                raise ValueError(f"nodule size {size_mm} mm at ({x}, {y}) is outside the 2048 x 2048 image")
        except (ValueError, IndexError) as err:
            c.skip(f"{path.name} line {line_no}", f"malformed nodule row: {err}")
            continue
        x1, y1, x2, y2 = circle_to_box(x, y, size_mm / PIXEL_MM)
        nodules[name] = (max(0.0, x1), max(0.0, y1), min(JSRT_SIDE, x2), min(JSRT_SIDE, y2))
    normal_path = find_file(c.root, "CNNDAT_EN.TXT", "CNNDAT_EN.txt", required=False)
    normals = set(NAME.findall(normal_path.read_text(encoding="latin-1").upper())) if normal_path else set()
    for name in sorted(set(nodules) | normals):
        if name not in paths:
            c.skip(name, f"image {name}.IMG not found below {c.root}")
            continue
        patient = f"{DATASET}_{name}"
        image = c.image(patient, paths[name], patient=patient, split="train", size=(JSRT_SIDE, JSRT_SIDE))
        found = {"Nodule": [nodules[name]]} if name in nodules else {}
        detection_samples(c, image, found, ["Nodule"], TASKS, split="train", patient=patient)
