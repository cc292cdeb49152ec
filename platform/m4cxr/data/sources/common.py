"""What every dataset adapter shares: finding files and columns by name, and the Collector that
turns what an adapter reads into common sample records.

An adapter is a module with `DATASET` (its name in Table 10) and `read(c: Collector)`. It reads
its dataset's official layout under `c.root`, registers each image it uses with `c.image(...)`
(nothing is decoded here: prepare resizes every image once, later, on Ray Data) and adds samples
with `c.add(...)`. Boxes are given in pixels of the original image; the text boxes (0..100) are
computed from the original size, which the resize does not change. A malformed record goes to
`c.skip(record, reason)`; a record a paper rule leaves out goes to `c.exclude(rule)`. Nothing is
dropped without one or the other.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from m4cxr.config import DataConfig
from m4cxr.boxes import enclosing_box, to_relative
from m4cxr.data.images import image_size
from m4cxr.data.schema import Sample
from m4cxr.tasks import render_conversation, task_type

SPLIT_NAMES = {"train": "train", "training": "train", "val": "validate", "valid": "validate",
               "validate": "validate", "validation": "validate", "test": "test", "testing": "test"}


class SourceError(ValueError):
    """A dataset folder that does not have the official layout: names the file and what is missing."""


def split_name(value: str, where: str) -> str:
    name = SPLIT_NAMES.get(str(value).strip().lower())
    if name is None:
        raise SourceError(f"{where}: split {value!r} is none of {sorted(set(SPLIT_NAMES))}")
    return name


# ----------------------------------------------------------------------------- files and tables


def find_file(root: Path, *names: str, required: bool = True) -> Path | None:
    """The first of `names` (paths under root) that exists; a .csv name also matches .csv.gz."""
    tried = []
    for name in names:
        for candidate in (name, name + ".gz") if name.endswith((".csv", ".txt")) else (name,):
            tried.append(candidate)
            if (root / candidate).exists():
                return root / candidate
    if required:
        raise SourceError(f"{root}: none of {tried} found (is this the dataset's official folder?)")
    return None


def open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8", newline="")
    return open(path, encoding="utf-8-sig", newline="")


@dataclass
class Table:
    """A CSV/TSV file read with header names stripped; rows are dicts, `line` their line number."""

    path: Path
    header: list[str]
    rows: list[dict[str, str]]

    def column(self, *names: str, required: bool = True) -> str | None:
        """The header name matching one of `names` (case and surrounding spaces ignored)."""
        lowered = {h.lower(): h for h in self.header}
        for name in names:
            if name.lower() in lowered:
                return lowered[name.lower()]
        if required:
            raise SourceError(f"{self.path}: no column {' or '.join(map(repr, names))}; "
                              f"the columns are {self.header}")
        return None


def read_table(path: Path, sep: str = ",", names: Sequence[str] | None = None) -> Table:
    """Read a delimited file by column name. `names` replaces the header (files whose header
    does not match their rows, like ChestX-ray14's BBox list)."""
    table = stream_table(path, sep, names)
    table.rows = list(table.rows)
    return table


def stream_table(path: Path, sep: str = ",", names: Sequence[str] | None = None) -> Table:
    """read_table whose rows are read one at a time as they are iterated (once): for the tables
    with a row per image or study, which are not worth holding as dicts."""
    f = open_text(path)
    reader = csv.reader(f, delimiter=sep)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        f.close()
        raise SourceError(f"{path}: empty file") from None
    if names is not None:
        header = list(names)

    def rows() -> Iterator[dict[str, str]]:
        with f:
            for line, values in enumerate(reader, start=2):
                if not any(v.strip() for v in values):
                    continue
                row = {h: (values[i].strip() if i < len(values) else "") for i, h in enumerate(header) if h}
                row["line"] = str(line)
                yield row

    return Table(path, header, rows())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SourceError(f"{path}: not valid JSON ({err})") from err


def chexpert_value(value: str | None, where: str) -> int | None:
    """CheXpert-style cell: 1 / 0 / -1 (also 1.0 ...); blank (or nan) is not mentioned."""
    text = (value or "").strip().lower()
    if text in ("", "nan"):
        return None
    if text not in ("1", "0", "-1", "1.0", "0.0", "-1.0"):
        raise ValueError(f"{where}: label value {value!r} is not 1, 0, -1 or blank")
    return int(float(text))


# ----------------------------------------------------------------------------- the collector


@dataclass(slots=True)  # one per image of the corpus: no per-object __dict__
class ImageRef:
    image_id: str
    path: str
    dataset: str
    patient_id: str
    study_id: str
    split: str
    view: str = ""


@dataclass
class Collector:
    """What one adapter produces: samples, the images they use, skipped and excluded records.
    With a `sink`, each sample goes to it as it is made (prepare writes them out in chunks) and
    `samples` stays empty; `added` counts them either way."""

    dataset: str
    root: Path
    config: DataConfig = field(default_factory=DataConfig)  # box convention, system prompt, image limits
    seed: int = 0  # the per-image choices (which finding, box or region a sample asks about)
    context: Any = None  # the PrepareContext: other sources' folders, shared indexes
    samples: list[Sample] = field(default_factory=list)
    images: dict[str, ImageRef] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    excluded: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    sink: Callable[[Sample], None] | None = None
    added: int = 0

    def __post_init__(self):
        self.root = Path(self.root)
        self.rng = np.random.default_rng([self.seed, zlib.crc32(self.dataset.encode())])

    # records left out
    def skip(self, record: Any, reason: str) -> None:
        self.skipped.append({"dataset": self.dataset, "record": str(record), "reason": reason})

    def exclude(self, rule: str, count: int = 1) -> None:
        self.excluded[rule] += count

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # images
    def image(self, image_id: str, path: Path | str, *, patient: str, split: str, study: str = "",
              view: str = "", size: tuple[int, int] | None = None) -> str:
        """Register an image (stored once however many samples use it); returns its id."""
        image_id = image_id.replace("/", "_").replace(" ", "_")
        if image_id not in self.images:
            self.images[image_id] = ImageRef(image_id, str(path), self.dataset, patient, study, split, view)
        if size:
            self.sizes[image_id] = (int(size[0]), int(size[1]))
        return image_id

    def size(self, image_id: str) -> tuple[int, int]:
        """The original (width, height), read from the file header when not given."""
        if image_id not in self.sizes:
            self.sizes[image_id] = image_size(self.images[image_id].path)
        return self.sizes[image_id]

    def rel(self, image_id: str, box: Sequence[float]) -> list[int]:
        width, height = self.size(image_id)
        return list(to_relative(box, width, height, self.config.box_convention))

    def choice(self, items: Sequence) -> Any:
        return items[int(self.rng.integers(len(items)))]

    # samples
    def add(self, task: str, fields: dict, images: Sequence[tuple[str, str]], *, split: str, patient: str,
            study: str = "", boxes: Iterable[tuple[str, int, Sequence[float]]] = (), labels: dict | None = None,
            report: str | None = None, prior_report: str | None = None,
            follow_ups: Sequence[tuple[str, str]] = (), template: str | None = None) -> Sample:
        """One sample of `task`, its conversation rendered from the task's template (or from
        `template`'s, where a task asks another task's question)."""
        turns = render_conversation(template or task, fields, self.config.system_prompt, follow_ups=follow_ups)
        sample = Sample(
            sample_id=f"{self.dataset}-{task}-{self.added}", task=task, task_type=task_type(task),
            dataset=self.dataset, split=split, patient_id=patient, study_id=study or images[0][0],
            images=[{"image_id": i, "role": r} for i, r in images], turns=turns, labels=dict(labels or {}),
            boxes=[{"label": name, "image_index": index, "box": [float(v) for v in box]} for name, index, box in boxes],
            report=report, prior_report=prior_report, answer=turns[-1]["content"],
        )
        self.added += 1
        if self.sink is None:
            self.samples.append(sample)
        else:
            self.sink(sample)
        return sample


# ----------------------------------------------------------------------------- task builders


def classification_sample(c: Collector, image_id: str, labels: dict[str, int], candidates: Sequence[str], *,
                          split: str, patient: str, study: str = "") -> Sample:
    """disease_classification: which of the dataset's own findings are present (uncertain = absent)."""
    positives = [name for name in candidates if labels.get(name) == 1]
    return c.add("disease_classification", {"findings": list(candidates), "positives": positives},
                 [(image_id, "current")], split=split, patient=patient, study=study,
                 labels={name: int(labels.get(name) == 1) for name in candidates})


def detection_samples(c: Collector, image_id: str, found: dict[str, list[Sequence[float]]],
                      candidates: Sequence[str], tasks: Iterable[str], *, split: str, patient: str,
                      study: str = "") -> None:
    """The box tasks of one image from its findings' pixel boxes (a finding with no boxes is
    absent). One sample per image per task, as Table 10 counts them:
    finding_grounding asks about a present finding (an absent one when there is none: "Not found."),
    grounded_finding names the finding of one box, abnormality_detection boxes every finding,
    multi_finding_grounding lists the present candidates with their boxes."""
    tasks = set(tasks)
    found = {name: sorted(boxes) for name, boxes in found.items() if boxes}
    unknown = [name for name in found if name not in candidates]
    if unknown:
        raise ValueError(f"findings {unknown} are not in the candidate list {list(candidates)}")
    rel = {name: [c.rel(image_id, b) for b in boxes] for name, boxes in found.items()}
    all_boxes = [(name, 0, box) for name, boxes in found.items() for box in boxes]
    common = dict(split=split, patient=patient, study=study)
    image = [(image_id, "current")]
    if "finding_grounding" in tasks:
        if found:
            name = c.choice(sorted(found))
            c.add("finding_grounding", {"finding": name, "bbox": rel[name]}, image,
                  boxes=[(name, 0, b) for b in found[name]], **common)
        else:
            c.add("finding_grounding", {"finding": c.choice(list(candidates)), "bbox": []}, image, **common)
    if found and "grounded_finding" in tasks:
        name, _, box = c.choice(all_boxes)
        c.add("grounded_finding", {"bbox": c.rel(image_id, box), "finding": name}, image,
              boxes=[(name, 0, box)], **common)
    if found and "abnormality_detection" in tasks:
        ordered = sorted(all_boxes, key=lambda item: (item[2][0], item[2][1]))
        c.add("abnormality_detection", {"bbox": [c.rel(image_id, b) for _, _, b in ordered]}, image,
              boxes=ordered, **common)
    if "multi_finding_grounding" in tasks:
        items = [(name, rel[name]) for name in candidates if name in found]
        c.add("multi_finding_grounding", {"findings": list(candidates), "findings_with_bboxes": items}, image,
              boxes=all_boxes, **common)


def lung_boxes(regions: Sequence[Sequence[float]], width: int) -> dict[str, tuple[float, float, float, float]]:
    """Boxes of a lung mask's regions -> {"right lung": box, "left lung": box}. The patient's right
    lung is on the image's left; regions on one side (a lung drawn in pieces) share one box."""
    sides: dict[str, list] = {}
    for box in regions:
        side = "right lung" if (box[0] + box[2]) / 2 < width / 2 else "left lung"
        sides.setdefault(side, []).append(box)
    return {side: enclosing_box(boxes) for side, boxes in sorted(sides.items())}


def organ_grounding_samples(c: Collector, image_id: str, organs: dict[str, Sequence[float]], *, split: str,
                  patient: str) -> None:
    """organ_grounding and grounded_organ: one sample each per image, on an organ drawn with the seed."""
    if not organs:
        return
    for task in ("organ_grounding", "grounded_organ"):
        organ = c.choice(sorted(organs))
        box = organs[organ]
        fields = {"organ": organ, "bbox": c.rel(image_id, box)}
        c.add(task, fields, [(image_id, "current")], boxes=[(organ, 0, box)], split=split, patient=patient)
