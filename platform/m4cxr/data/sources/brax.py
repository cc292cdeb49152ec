"""BRAX: disease classification with the CheXpert labels (DATASETS.md section 13).

master_spreadsheet_update.csv (older: master_spreadsheet.csv) has PngPath and DicomPath (relative
to the folder), ViewPosition and the 14 CheXpert labels (1 / 0 / -1 / blank; uncertain counts as
absent). The PNG is used when present, else the DICOM. The patient is the id_<PatientID> folder of
the path. There is no official split: every image is a training image.
"""

from __future__ import annotations

import re

from m4cxr.data.sources.common import (
    Collector, chexpert_value, classification_sample, find_file, stream_table,
)
from m4cxr.tasks import chexbert_labels, cot_candidates

DATASET = "brax"


def read(c: Collector) -> None:
    table = stream_table(find_file(c.root, "master_spreadsheet_update.csv", "master_spreadsheet.csv"))
    png, dicom = table.column("PngPath", required=False), table.column("DicomPath", required=False)
    if png is None and dicom is None:
        table.column("PngPath", "DicomPath")  # raises, naming both
    names = {n: table.column(n) for n in chexbert_labels()}
    for row in table.rows:
        record = f"{table.path.name} line {row['line']}"
        try:
            paths = [c.root / row[col] for col in (png, dicom) if col and row[col]]
            path = next((p for p in paths if p.exists()), None)
            if path is None:
                raise ValueError(f"no image at {[str(p.relative_to(c.root)) for p in paths]}")
            labels = {n: chexpert_value(row[col], record) for n, col in names.items()}
            match = re.search(r"id_([^/\\]+)", str(path))
            if match is None:
                raise ValueError(f"no id_<PatientID> folder in {path.relative_to(c.root)}")
        except ValueError as err:
            c.skip(record, str(err))
            continue
        patient = f"{DATASET}_{match.group(1)}"
        stem = "_".join(path.relative_to(c.root).with_suffix("").parts[-3:])
        image = c.image(f"{DATASET}_{stem}", path, patient=patient, split="train", view=row.get("ViewPosition", ""))
        classification_sample(c, image, {k: v for k, v in labels.items() if v is not None}, cot_candidates(),
                              split="train", patient=patient)
