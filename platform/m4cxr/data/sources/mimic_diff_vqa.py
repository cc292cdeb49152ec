"""MIMIC-Diff-VQA (Medical-Diff-VQA): VQA and difference VQA on MIMIC-CXR images (DATASETS.md
section 16).

mimic_pair_questions.csv has study_id (the main, later study), subject_id, ref_id (the earlier
reference study), question_type, question, answer and split; mimic_all.csv maps each study to its
frontal dicom_id. "difference" questions become difference_vqa (reference and main images); the
other six types become vqa on the main image. Images come from the mimic_cxr source.
"""

from __future__ import annotations

from m4cxr.data.sources.common import Collector, find_file, split_name, stream_table
from m4cxr.data.sources.mimic_cxr import patient_id

DATASET = "mimic_diff_vqa"


def read(c: Collector) -> None:
    index = c.context.mimic(needed_by=DATASET)
    studies = stream_table(find_file(c.root, "mimic_all.csv"))
    study_col, dicom_col = studies.column("study_id"), studies.column("dicom_id")
    frontal = {}
    for row in studies.rows:
        try:
            frontal[str(int(float(row[study_col])))] = row[dicom_col]
        except ValueError:
            c.skip(f"{studies.path.name} line {row['line']}", f"study_id {row[study_col]!r} is not a number")
    table = stream_table(find_file(c.root, "mimic_pair_questions.csv"))
    cols = {k: table.column(k) for k in ("study_id", "subject_id", "ref_id", "question_type", "question", "answer",
                                         "split")}
    for row in table.rows:
        record = f"{table.path.name} line {row['line']}"
        try:
            main = str(int(float(row[cols["study_id"]])))
            subject = str(int(float(row[cols["subject_id"]])))
            split = split_name(row[cols["split"]], record)
            kind, question, answer = row[cols["question_type"]].strip(), row[cols["question"]], row[cols["answer"]]
            if not question or not answer:
                raise ValueError("empty question or answer")
            studies_needed = [main] + ([str(int(float(row[cols["ref_id"]])))] if kind == "difference" else [])
            dicoms = []
            for study in studies_needed:
                if frontal.get(study) not in index.images:
                    raise ValueError(f"study {study} has no image in mimic_all.csv and the MIMIC-CXR-JPG metadata")
                dicoms.append(frontal[study])
        except ValueError as err:
            c.skip(record, str(err))
            continue
        ids = [index.register(c, d, split=split) for d in dicoms]
        common = dict(split=split, patient=patient_id(subject), study=main)
        if kind == "difference":
            c.add("difference_vqa", {"question": question, "answer": answer},
                  [(ids[1], "reference"), (ids[0], "main")], **common)
        else:
            c.add("vqa", {"question": question, "answer": answer}, [(ids[0], "current")], **common)
