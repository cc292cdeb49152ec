"""Chest ImaGenome: anatomical-region grounding and region phrases on MIMIC-CXR images
(DATASETS.md section 3), following Tanida et al.'s preprocessing (29 regions, boxes clamped to
the image, zero-area boxes dropped, the gold-standard images left out).

silver_dataset/splits/{train,valid,test}.csv name the images of each split (the file name is the
split); silver_dataset/scene_graph/<dicom_id>_SceneGraph.json (also scene_graph/scene_graph/)
holds each image's objects (boxes in original pixels: original_x1 ... original_y2) and
attributes (the report phrases of each region). images_to_avoid.csv lists the gold-standard
images. Images come from the mimic_cxr source.

One sample per image and task, each on a region drawn with the preparation seed, as Table 10
counts them.
"""

from __future__ import annotations

from m4cxr.data.sources.common import Collector, SourceError, find_file, read_json, stream_table
from m4cxr.data.sources.mimic_cxr import patient_id

DATASET = "imagenome"
REGIONS = (
    "right lung", "right upper lung zone", "right mid lung zone", "right lower lung zone", "right hilar structures",
    "right apical zone", "right costophrenic angle", "right hemidiaphragm", "left lung", "left upper lung zone",
    "left mid lung zone", "left lower lung zone", "left hilar structures", "left apical zone",
    "left costophrenic angle", "left hemidiaphragm", "trachea", "spine", "right clavicle", "left clavicle",
    "aortic arch", "mediastinum", "upper mediastinum", "svc", "cardiac silhouette", "cavoatrial junction",
    "right atrium", "carina", "abdomen",
)
SPLIT_FILES = {"train": "train.csv", "validate": "valid.csv", "test": "test.csv"}


def scene_graph_path(silver, dicom: str):
    for folder in ("scene_graph", "scene_graph/scene_graph"):
        path = silver / folder / f"{dicom}_SceneGraph.json"
        if path.exists():
            return path
    return None


def region_boxes(graph: dict, width: int, height: int) -> dict[str, tuple[float, float, float, float]]:
    boxes = {}
    for obj in graph.get("objects", []):
        name = str(obj.get("bbox_name", "")).lower()
        if name not in REGIONS:
            continue
        x1, y1, x2, y2 = (float(obj[k]) for k in ("original_x1", "original_y1", "original_x2", "original_y2"))
        x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
        if x2 > x1 and y2 > y1:
            boxes[name] = (x1, y1, x2, y2)
    return boxes


def region_phrases(graph: dict) -> dict[str, str]:
    phrases = {}
    for attr in graph.get("attributes", []):
        name = str(attr.get("bbox_name", "")).lower()
        text = " ".join(p.strip() for p in attr.get("phrases", []) if p and p.strip())
        if name in REGIONS and text:
            phrases[name] = text
    return phrases


def read(c: Collector) -> None:
    silver = c.root / "silver_dataset" if (c.root / "silver_dataset").is_dir() else c.root
    if not (silver / "splits").is_dir():
        raise SourceError(f"{c.root}: no silver_dataset/splits/ folder (is this the Chest ImaGenome folder?)")
    index = c.context.mimic(needed_by=DATASET)
    avoid_path = find_file(silver / "splits", "images_to_avoid.csv", required=False)
    avoid = set()
    if avoid_path is not None:
        table = stream_table(avoid_path)
        avoid = {row[table.column("dicom_id")] for row in table.rows}
    for split, name in SPLIT_FILES.items():
        table = stream_table(find_file(silver / "splits", name))
        cols = {k: table.column(k) for k in ("subject_id", "study_id", "dicom_id")}
        for row in table.rows:
            record = f"{table.path.name} line {row['line']}"
            dicom = row[cols["dicom_id"]]
            if dicom in avoid:
                c.exclude("gold-standard image (images_to_avoid.csv)")
                continue
            path = scene_graph_path(silver, dicom)
            try:
                if dicom not in index.images:
                    raise ValueError(f"dicom_id {dicom!r} is not in the MIMIC-CXR-JPG metadata")
                if path is None:
                    raise ValueError(f"no scene graph {dicom}_SceneGraph.json")
                graph = read_json(path)
                mimic = index.images[dicom]
                boxes = region_boxes(graph, mimic.width, mimic.height)
                phrases = {k: v for k, v in region_phrases(graph).items() if k in boxes}
                common = dict(split=split, patient=patient_id(str(int(row[cols["subject_id"]]))),
                              study=str(int(row[cols["study_id"]])))
            except (ValueError, KeyError, TypeError) as err:
                c.skip(record, str(err) if isinstance(err, ValueError) else f"malformed scene graph: {err!r}")
                continue
            if not boxes:
                c.skip(record, "no region box inside the image")
                continue
            image = index.register(c, dicom, split=split)
            names = {region: region for region in boxes}
            for task, key, texts in (("anatomical_region_grounding", "name", names),
                                     ("grounded_anatomical_region", "name", names),
                                     ("phrase_grounding", "phrase", phrases),
                                     ("grounded_phrase_generation", "phrase", phrases)):
                if texts:  # each task on a region drawn with the seed
                    region = c.choice(sorted(texts))
                    c.add(task, {key: texts[region], "bbox": c.rel(image, boxes[region])}, [(image, "current")],
                          boxes=[(texts[region], 0, boxes[region])], **common)
