"""MIMIC-CXR-VQA (EHRXQA): VQA on MIMIC-CXR images (DATASETS.md section 15).

dataset/{train,valid,test}.json (also under MIMIC-Ext-MIMIC-CXR-VQA/) are JSON lists of
questions with subject_id, study_id, image_id (the dicom_id), question and answer (a list of
lower-case strings, joined here with ", " and ended with a period as the authors do). Questions
without an answer are left out, as the paper does for its test set. Images come from the mimic_cxr source.
"""

from __future__ import annotations

from m4cxr.data.sources.common import Collector, SourceError, read_json
from m4cxr.data.sources.mimic_cxr import patient_id

DATASET = "mimic_cxr_vqa"
SPLIT_FILES = {"train": "train.json", "validate": "valid.json", "test": "test.json"}


def dataset_folder(root):
    for folder in (root / "MIMIC-Ext-MIMIC-CXR-VQA" / "dataset", root / "dataset", root):
        if (folder / "train.json").exists() or (folder / "test.json").exists():
            return folder
    raise SourceError(f"{root}: no dataset/train.json or dataset/test.json (is this the MIMIC-CXR-VQA folder?)")


def read(c: Collector) -> None:
    folder = dataset_folder(c.root)
    index = c.context.mimic(needed_by=DATASET)
    for split, name in SPLIT_FILES.items():
        if not (folder / name).exists():
            c.note(f"no {name}: the {split} split is empty")
            continue
        records = read_json(folder / name)
        if not isinstance(records, list):
            raise SourceError(f"{folder / name}: expected a JSON list of questions")
        for n, rec in enumerate(records):
            record = f"{name}[{n}]"
            try:
                dicom, question = str(rec["image_id"]), str(rec["question"]).strip()
                answer = rec.get("answer")
                if dicom not in index.images:
                    raise ValueError(f"image_id {dicom!r} is not in the MIMIC-CXR-JPG metadata")
                if not question:
                    raise ValueError("empty question")
                if answer is not None and not isinstance(answer, list):
                    raise ValueError(f"answer must be a list of strings, got {type(answer).__name__}")
                subject = str(int(rec["subject_id"]))
            except (KeyError, ValueError, TypeError, AttributeError) as err:
                c.skip(record, f"malformed question: {err!r}" if not isinstance(err, ValueError) else str(err))
                continue
            if not answer:
                c.exclude("question without an answer")
                continue
            image = index.register(c, dicom, split=split)
            c.add("vqa", {"question": question, "answer": ", ".join(str(a) for a in answer) + "."}, [(image, "current")],
                  split=split, patient=patient_id(subject), study=str(rec.get("study_id", "")))
