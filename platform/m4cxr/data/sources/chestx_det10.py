"""ChestX-Det10: disease classification and the box tasks (DATASETS.md section 6).

train.json and test.json (the split) are lists of {"file_name", "syms", "boxes"}: syms[i] is the
finding of boxes[i], pixel [x1, y1, x2, y2]. The ChestX-Det successor's "polygons" (a point list
per box) become their enclosing boxes, the paper's mask rule. PNGs lie anywhere below the folder.
"""

from __future__ import annotations

from collections import defaultdict

from m4cxr.boxes import enclosing_box
from m4cxr.data.sources.common import (
    Collector, SourceError, classification_sample, detection_samples, find_file, read_json,
)

DATASET = "chestx_det10"
LABELS = ("Atelectasis", "Calcification", "Consolidation", "Effusion", "Emphysema", "Fibrosis", "Fracture", "Mass",
          "Nodule", "Pneumothorax")
TASKS = ("finding_grounding", "grounded_finding", "abnormality_detection", "multi_finding_grounding")


def read(c: Collector) -> None:
    paths = {p.name: p for p in c.root.rglob("*.png")}
    for split, name in (("train", "train.json"), ("test", "test.json")):
        path = find_file(c.root, name, "ChestX_Det_" + name)
        items = read_json(path)
        if not isinstance(items, list):
            raise SourceError(f"{path}: expected a JSON list")
        for n, item in enumerate(items):
            record = f"{path.name}[{n}]"
            try:
                file_name, syms = item["file_name"], item["syms"]
                polygons = item.get("polygons")
                boxes = ([enclosing_box([(x, y, x, y) for x, y in poly]) for poly in polygons]
                         if polygons else item["boxes"])
                if len(syms) != len(boxes):
                    raise ValueError(f"{len(syms)} syms but {len(boxes)} boxes")
                found = defaultdict(list)
                for sym, box in zip(syms, boxes):
                    if sym not in LABELS:
                        raise ValueError(f"finding {sym!r} is not one of {LABELS}")
                    x1, y1, x2, y2 = (float(v) for v in box)
                    if x2 <= x1 or y2 <= y1:
                        raise ValueError(f"empty box {box}")
                    found[sym].append((x1, y1, x2, y2))
                if file_name not in paths:
                    raise ValueError(f"image {file_name} not found below {c.root}")
            except (KeyError, ValueError, TypeError) as err:
                c.skip(record, str(err) if isinstance(err, ValueError) else f"malformed item: {err!r}")
                continue
            patient = f"{DATASET}_{file_name.rsplit('.', 1)[0]}"
            image = c.image(patient, paths[file_name], patient=patient, split=split)
            common = dict(split=split, patient=patient)
            classification_sample(c, image, {k: 1 for k in found}, LABELS, **common)
            detection_samples(c, image, dict(found), LABELS, TASKS, **common)
