"""Organ-grounding samples from lung boxes in COCO format.

Reads a COCO file whose categories are organs ("Right Lung", "Left Lung", ...) with
bbox = [x, y, width, height] in pixels, as in the lung-box re-release of the
ieee8023/covid-chestxray-dataset images. Each image is stored once (shortest edge resized to
the encoder size) and each box becomes an organ_grounding and a grounded_organ sample through
the common record, box and template code. Unreadable images and malformed boxes are skipped
and reported, never dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from m4cxr.config import DEFAULT_SYSTEM_PROMPT
from m4cxr.boxes import to_relative
from m4cxr.data.images import resize_shortest_edge
from m4cxr.data.schema import ImageStore, Sample, write_manifest, write_samples
from m4cxr.data.stats import corpus_stats
from m4cxr.tasks import render_conversation, task_type

DATASET = "covid_chestxray_lungs"


def organ_samples(coco_path: str | Path, image_dir: str | Path, store: ImageStore, image_size: int = 518,
                  convention: str = "resize", system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                  split: str = "test") -> tuple[list[Sample], list[dict]]:
    coco = json.loads(Path(coco_path).read_text())
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise ValueError(f"{coco_path}: not a COCO file, no '{key}'")
    organs = {c["id"]: c["name"].strip().lower() for c in coco["categories"]}
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    samples: list[Sample] = []
    skipped: list[dict] = []
    for info in coco["images"]:
        record = info.get("file_name", str(info.get("id")))
        path = Path(image_dir) / record
        try:
            with Image.open(path) as raw:
                raw.load()
                image = raw.convert("L")
        except (OSError, UnidentifiedImageError) as err:
            skipped.append({"dataset": DATASET, "record": record, "reason": f"unreadable image: {err}"})
            continue
        stored, scale = resize_shortest_edge(image, image_size)
        meta = info.get("metadata", {})
        image_id = f"{DATASET}_{info['id']}"
        patient = f"{DATASET}_{meta.get('patientid', info['id'])}"
        store.put(image_id, stored, view=meta.get("view", ""), dataset=DATASET, patient_id=patient,
                  study_id=image_id, split=split)
        for ann in by_image.get(info["id"], []):
            x, y, w, h = (float(v) for v in ann.get("bbox", [0, 0, 0, 0]))
            if w <= 0 or h <= 0 or ann.get("category_id") not in organs:
                skipped.append({"dataset": DATASET, "record": f"{record}#{ann.get('id')}",
                                "reason": f"malformed box {ann.get('bbox')} or unknown category {ann.get('category_id')}"})
                continue
            x1, y1 = max(0.0, x), max(0.0, y)
            x2, y2 = min(float(image.width), x + w), min(float(image.height), y + h)
            box_px = [x1 * scale, y1 * scale, x2 * scale, y2 * scale]
            rel = list(to_relative(box_px, stored.width, stored.height, convention))
            organ = organs[ann["category_id"]]
            for task, fields in (("organ_grounding", {"organ": organ, "bbox": rel}),
                                 ("grounded_organ", {"bbox": rel, "organ": organ})):
                turns = render_conversation(task, fields, system_prompt)
                samples.append(Sample(
                    sample_id=f"{task}-{image_id}-{ann['id']}", task=task, task_type=task_type(task),
                    dataset=DATASET, split=split, patient_id=patient, study_id=image_id,
                    images=[{"image_id": image_id, "role": "current"}], turns=turns,
                    boxes=[{"label": organ, "image_index": 0, "box": box_px}], answer=turns[-1]["content"],
                ))
    return samples, skipped


def write_organ_corpus(coco_path, image_dir, out_dir, image_size: int = 518, convention: str = "resize",
                       system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> dict:
    store = ImageStore(out_dir)
    samples, skipped = organ_samples(coco_path, image_dir, store, image_size, convention, system_prompt)
    store.write_index()
    write_samples(samples, out_dir)
    manifest = corpus_stats(out_dir)
    manifest["skipped"] = skipped
    manifest["source"] = {"kind": "coco_lung_boxes", "coco": str(coco_path)}
    write_manifest(out_dir, manifest)
    return manifest
