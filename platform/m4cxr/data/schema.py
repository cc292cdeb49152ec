"""The sample record (Arrow schema, stored as Parquet) and the image store.

A corpus folder holds:
    images/<image_id>.png      every image once, pre-resized, referenced by id from samples
    images.parquet             the image index (size, view, patient, study, dataset, split)
    samples/<split>.parquet    one row per conversation (SAMPLE_SCHEMA)
    manifest.json              counts and checks, written by whoever built the corpus

A sample keeps the rendered conversation and, beside it, the structured targets (labels, boxes,
report, answer) so that evaluation never has to parse the text back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SPLITS = ("train", "validate", "test")
IMAGE_ROLES = ("current", "prior", "reference", "main")

IMAGE_REF = pa.struct([("image_id", pa.string()), ("role", pa.string())])
TURN = pa.struct([("role", pa.string()), ("content", pa.string())])
LABEL = pa.struct([("name", pa.string()), ("value", pa.int8())])  # 1 positive, 0 negative, -1 uncertain
BOX = pa.struct([
    ("label", pa.string()),
    ("image_index", pa.int16()),  # which of the sample's images the box is on
    ("box", pa.list_(pa.float64(), 4)),  # x1, y1, x2, y2 in pixels of the stored image
])

SAMPLE_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("task", pa.string()),
    ("task_type", pa.string()),
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("patient_id", pa.string()),
    ("study_id", pa.string()),
    ("images", pa.list_(IMAGE_REF)),
    ("turns", pa.list_(TURN)),
    ("labels", pa.list_(LABEL)),
    ("boxes", pa.list_(BOX)),
    ("report", pa.string()),
    ("prior_report", pa.string()),
    ("answer", pa.string()),  # the final assistant target as text
])

IMAGE_INDEX_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("path", pa.string()),  # relative to the corpus folder
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("view", pa.string()),  # PA, AP, LATERAL, ...
    ("dataset", pa.string()),
    ("patient_id", pa.string()),
    ("study_id", pa.string()),
    ("split", pa.string()),
])


@dataclass
class Sample:
    """One conversation and its structured targets (the Python side of SAMPLE_SCHEMA)."""

    sample_id: str
    task: str
    task_type: str
    dataset: str
    split: str
    patient_id: str
    study_id: str
    images: list[dict[str, str]]
    turns: list[dict[str, str]]
    labels: dict[str, int] = field(default_factory=dict)
    boxes: list[dict[str, Any]] = field(default_factory=list)
    report: str | None = None
    prior_report: str | None = None
    answer: str | None = None

    def to_row(self) -> dict[str, Any]:
        row = dict(self.__dict__)
        row["labels"] = [{"name": k, "value": int(v)} for k, v in self.labels.items()]
        row["boxes"] = [
            {"label": b["label"], "image_index": int(b.get("image_index", 0)), "box": [float(v) for v in b["box"]]}
            for b in self.boxes
        ]
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Sample":
        row = dict(row)
        row["labels"] = {item["name"]: int(item["value"]) for item in row.get("labels") or []}
        row["boxes"] = [
            {"label": b["label"], "image_index": int(b["image_index"]), "box": [float(v) for v in b["box"]]}
            for b in row.get("boxes") or []
        ]
        row["images"] = [dict(i) for i in row["images"]]
        row["turns"] = [dict(t) for t in row["turns"]]
        return cls(**{k: row.get(k) for k in cls.__dataclass_fields__})


def samples_to_table(samples: Iterable[Sample]) -> pa.Table:
    return pa.Table.from_pylist([s.to_row() for s in samples], schema=SAMPLE_SCHEMA)


def write_samples(samples: Iterable[Sample], corpus_dir: str | Path) -> dict[str, int]:
    """Write samples as samples/<split>.parquet; returns the count per split."""
    out = Path(corpus_dir) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[Sample]] = {}
    for s in samples:
        if s.split not in SPLITS:
            raise ValueError(f"sample {s.sample_id}: split {s.split!r} is not one of {SPLITS}")
        by_split.setdefault(s.split, []).append(s)
    for split, rows in by_split.items():
        pq.write_table(samples_to_table(rows), out / f"{split}.parquet")
    return {split: len(rows) for split, rows in by_split.items()}


def samples_path(corpus_dir: str | Path, split: str | None = None) -> Path:
    base = Path(corpus_dir) / "samples"
    return base if split is None else base / f"{split}.parquet"


def read_sample_table(corpus_dir: str | Path, split: str | None = None) -> pa.Table:
    """All samples of a corpus (or one split) as an Arrow table, checked against the schema."""
    paths = [samples_path(corpus_dir, split)] if split else sorted(samples_path(corpus_dir).glob("*.parquet"))
    if not paths or not all(p.exists() for p in paths):
        raise FileNotFoundError(f"no samples under {samples_path(corpus_dir, split)}")
    tables = []
    for p in paths:
        table = pq.read_table(p)
        missing = [n for n in SAMPLE_SCHEMA.names if n not in table.schema.names]
        if missing:
            raise ValueError(f"{p}: not a sample file, missing columns {missing}")
        tables.append(table.select(SAMPLE_SCHEMA.names).cast(SAMPLE_SCHEMA))
    return pa.concat_tables(tables)


def read_samples(corpus_dir: str | Path, split: str | None = None) -> list[Sample]:
    return [Sample.from_row(r) for r in read_sample_table(corpus_dir, split).to_pylist()]


class ImageStore:
    """Images stored once under <corpus>/images/, indexed in <corpus>/images.parquet."""

    def __init__(self, corpus_dir: str | Path):
        self.root = Path(corpus_dir)
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        self.index: dict[str, dict[str, Any]] = {}
        index_path = self.root / "images.parquet"
        if index_path.exists():
            self.index = {r["image_id"]: r for r in pq.read_table(index_path).to_pylist()}

    def put(self, image_id: str, image: Image.Image | np.ndarray, **meta: Any) -> dict[str, Any]:
        """Store an image under its id (once: a second put of the same id keeps the first)."""
        if image_id in self.index:
            return self.index[image_id]
        if "/" in image_id or image_id.startswith("."):
            raise ValueError(f"image id {image_id!r} must be a plain file name")
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        rel = f"images/{image_id}.png"
        image.save(self.root / rel, optimize=False, compress_level=1)
        row = {"image_id": image_id, "path": rel, "width": image.width, "height": image.height,
               "view": meta.get("view", ""), "dataset": meta.get("dataset", ""),
               "patient_id": meta.get("patient_id", ""), "study_id": meta.get("study_id", ""),
               "split": meta.get("split", "")}
        self.index[image_id] = row
        return row

    def size(self, image_id: str) -> tuple[int, int]:
        row = self.index[image_id]
        return row["width"], row["height"]

    def path(self, image_id: str) -> Path:
        if image_id not in self.index:
            raise KeyError(f"image {image_id!r} is not in the store at {self.root}")
        return self.root / self.index[image_id]["path"]

    def load(self, image_id: str) -> Image.Image:
        return Image.open(self.path(image_id))

    def write_index(self) -> Path:
        path = self.root / "images.parquet"
        pq.write_table(pa.Table.from_pylist(list(self.index.values()), schema=IMAGE_INDEX_SCHEMA), path)
        return path


def write_manifest(corpus_dir: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(corpus_dir) / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return path
