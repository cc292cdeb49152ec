"""MS-CXR: phrase grounding and grounded phrase generation on MIMIC-CXR images (DATASETS.md section 2).

MS_CXR_Local_Alignment_v1.1.0.csv (or v1.0.0, the v0.1 release) has one row per box: dicom_id,
category_name, label_text (the phrase), x, y, w, h (pixels of the original image), image_width,
image_height and, from v1.1.0, split. Rows of one (dicom_id, label_text) are one phrase's boxes.
Without a split column the image's MIMIC-CXR split is used. The images come from the mimic_cxr
source (--source mimic_cxr=PATH).

Its images are kept out of every other dataset's training samples by prepare (the paper's rule).
"""

from __future__ import annotations

from m4cxr.boxes import enclosing_box
from m4cxr.data.sources.common import Collector, SourceError, split_name, stream_table

DATASET = "ms_cxr"


def read(c: Collector) -> None:
    files = sorted(c.root.glob("MS_CXR_Local_Alignment_*.csv"), reverse=True)  # the newest version first
    if not files:
        raise SourceError(f"{c.root}: no MS_CXR_Local_Alignment_*.csv (is this the MS-CXR folder?)")
    table = stream_table(files[0])
    cols = {k: table.column(k) for k in ("dicom_id", "label_text", "x", "y", "w", "h", "image_width", "image_height")}
    split_col = table.column("split", required=False)
    if split_col is None:
        c.note(f"{files[0].name} has no split column: MIMIC-CXR's split of each image is used")
    index = c.context.mimic(needed_by=DATASET)
    phrases: dict[tuple[str, str], dict] = {}
    for row in table.rows:
        record = f"{files[0].name} line {row['line']}"
        try:
            dicom = row[cols["dicom_id"]]
            if dicom not in index.images:
                raise ValueError(f"dicom_id {dicom!r} is not in the MIMIC-CXR-JPG metadata")
            x, y, w, h = (float(row[cols[k]]) for k in ("x", "y", "w", "h"))
            size = (int(float(row[cols["image_width"]])), int(float(row[cols["image_height"]])))
            if w <= 0 or h <= 0 or min(size) <= 0:
                raise ValueError(f"empty box or image size: x={x} y={y} w={w} h={h} size={size}")
            phrase = row[cols["label_text"]].strip()
            if not phrase:
                raise ValueError("empty label_text")
            split = split_name(row[split_col], record) if split_col else index.images[dicom].split
        except (ValueError, KeyError) as err:
            c.skip(record, str(err))
            continue
        item = phrases.setdefault((dicom, phrase), {"boxes": [], "size": size, "split": split})
        item["boxes"].append((max(0.0, x), max(0.0, y), min(size[0], x + w), min(size[1], y + h)))
    for (dicom, phrase), item in phrases.items():
        image = index.register(c, dicom, split=item["split"])
        c.sizes[image] = item["size"]  # the boxes are in this frame
        boxes = sorted(item["boxes"])
        common = dict(split=item["split"], patient=c.images[image].patient_id,
                      study=index.images[dicom].study_id)
        c.add("phrase_grounding", {"phrase": phrase, "bbox": [c.rel(image, b) for b in boxes]},
              [(image, "current")], boxes=[(phrase, 0, b) for b in boxes], **common)
        box = enclosing_box(boxes)
        c.add("grounded_phrase_generation", {"bbox": c.rel(image, box), "phrase": phrase},
              [(image, "current")], boxes=[(phrase, 0, box)], **common)
