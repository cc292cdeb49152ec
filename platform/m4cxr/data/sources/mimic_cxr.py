"""MIMIC-CXR / MIMIC-CXR-JPG: report generation in its three scenarios (DATASETS.md section 1).

The folder holds the JPG release's tables (mimic-cxr-2.0.0-metadata, -split and, optionally,
-chexpert, as .csv or .csv.gz), the images under files/p<2>/p<subject>/s<study>/<dicom_id>.jpg
(.dcm for the DICOM release) and the reports beside the study folders,
files/p<2>/p<subject>/s<study>.txt (also accepted under mimic-cxr-reports/files/).

The paper's rules (its preprocessing section and Tables 8 and 10), for the studies whose report
has FINDINGS (the official section extraction, then R2Gen cleaning; no FINDINGS, or FINDINGS
under 5 characters: left out):

- single-image: every image of the study;
- multi-image: the study, when it has 1 to 5 images ("one or more images ... within the same
  study": Table 10's 151,606 multi-image instances from 270,236 images count one-image studies);
- multi-study: the study with the patient's previous study in time (StudyDate, StudyTime), when
  that one has FINDINGS too and the two have at most 10 images in all;
- the test split, as the paper evaluates: one multi-image and one multi-study instance per
  frontal (PA, AP) image, each of that image's study led by that image (2,461 of each on the
  official split: a study with a PA and an AP view is two instances, one per lead view); the
  multi-study one with the prior study when there is one, else asked as multi-image (128 of the
  paper's 2,461 have none). Its single-image instances are every image (3,858); the frontal ones
  are the paper's other single-image test set (2,461).

Chain-of-thought answers come from the CheXpert label file, or from our rule-based labeler for
studies it lacks.

`MimicIndex` (the images, their studies, splits and times) serves every MIMIC-derived dataset:
MS-CXR, Chest ImaGenome, MIMIC-CXR-VQA, MIMIC-Diff-VQA and RaDialog.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from m4cxr.data.sources.common import (
    Collector, SourceError, chexpert_value, find_file, split_name, stream_table,
)
from m4cxr.labeler import label_report
from m4cxr.data.sources.mimic_reports import clean_report, findings_section
from m4cxr.tasks import chexbert_labels, cot_candidates, positive_findings

DATASET = "mimic_cxr"
FRONTAL = ("PA", "AP")


def patient_id(subject_id: str) -> str:
    """One namespace for every MIMIC-derived dataset, so a patient is the same patient in all."""
    return sys.intern(f"mimic_{subject_id}")  # one string per patient, however many images refer to it


def image_id(dicom_id: str) -> str:
    return f"mimic_{dicom_id}"


@dataclass(slots=True)  # one per MIMIC-CXR image, held while the MIMIC-derived datasets are read
class MimicImage:
    dicom_id: str
    subject_id: str
    study_id: str
    split: str
    view: str
    width: int
    height: int
    time: str  # sortable "YYYYMMDDHHMMSS.fff"


class MimicIndex:
    """The MIMIC-CXR-JPG metadata and split tables, read once (row by row; the ids and values
    that repeat across a study's images are stored once)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        meta = stream_table(find_file(self.root, "mimic-cxr-2.0.0-metadata.csv"))
        split = stream_table(find_file(self.root, "mimic-cxr-2.0.0-split.csv"))
        self.skipped: list[tuple[str, str]] = []
        splits: dict[str, str] = {}
        dicom, split_col = split.column("dicom_id"), split.column("split")
        for row in split.rows:
            try:
                splits[row[dicom]] = split_name(row[split_col], f"{split.path} line {row['line']}")
            except SourceError as err:
                self.skipped.append((f"{split.path.name} line {row['line']}", str(err)))
        cols = {k: meta.column(k) for k in ("dicom_id", "subject_id", "study_id", "ViewPosition", "Rows",
                                             "Columns", "StudyDate", "StudyTime")}
        self.images: dict[str, MimicImage] = {}
        self.studies: dict[str, list[str]] = defaultdict(list)
        for row in meta.rows:
            record = f"{meta.path.name} line {row['line']}"
            try:
                d = row[cols["dicom_id"]]
                if d not in splits:
                    raise ValueError(f"dicom_id {d!r} is not in the split file")
                when = f"{int(float(row[cols['StudyDate']])):08d}{float(row[cols['StudyTime']] or 0):010.3f}"
                image = MimicImage(d, sys.intern(str(int(row[cols["subject_id"]]))),
                                   sys.intern(str(int(row[cols["study_id"]]))), splits[d],
                                   sys.intern(row[cols["ViewPosition"]].upper()), int(float(row[cols["Columns"]])),
                                   int(float(row[cols["Rows"]])), sys.intern(when))
            except (ValueError, KeyError) as err:
                self.skipped.append((record, f"malformed metadata row: {err}"))
                continue
            self.images[d] = image
            self.studies[image.study_id].append(d)

    def image_path(self, image: MimicImage) -> Path:
        folder = self.root / "files" / f"p{image.subject_id[:2]}" / f"p{image.subject_id}" / f"s{image.study_id}"
        jpg = folder / f"{image.dicom_id}.jpg"
        dcm = folder / f"{image.dicom_id}.dcm"
        return dcm if not jpg.exists() and dcm.exists() else jpg

    def report_path(self, subject_id: str, study_id: str) -> Path | None:
        rel = Path("files") / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}.txt"
        for base in (self.root, self.root / "mimic-cxr-reports"):
            if (base / rel).exists():
                return base / rel
        return None

    def register(self, c: Collector, dicom_id: str, split: str | None = None) -> str:
        """Register a MIMIC image with a collector (any MIMIC-derived dataset); returns its image id."""
        if image_id(dicom_id) in c.images:  # already registered: no second look at the disk
            return image_id(dicom_id)
        image = self.images[dicom_id]
        return c.image(image_id(dicom_id), self.image_path(image), patient=patient_id(image.subject_id),
                       study=image.study_id, split=split or image.split, view=image.view,
                       size=(image.width, image.height))

    def study_order(self, dicom_ids: list[str]) -> list[str]:
        """Frontal views first, then the others; ties by dicom_id."""
        return sorted(dicom_ids, key=lambda d: (self.images[d].view not in FRONTAL, d))


def read_labels(c: Collector) -> dict[str, bytes]:
    """study_id -> CheXpert-14 labels from mimic-cxr-2.0.0-chexpert (empty when the file is absent),
    packed (`pack_labels`): the table has a row per study."""
    path = find_file(c.root, "mimic-cxr-2.0.0-chexpert.csv", required=False)
    if path is None:
        c.note("no mimic-cxr-2.0.0-chexpert file: chain-of-thought labels come from the rule-based labeler")
        return {}
    table = stream_table(path)
    study, names = table.column("study_id"), {n: table.column(n) for n in chexbert_labels()}
    labels = {}
    for row in table.rows:
        try:
            values = {n: chexpert_value(row[col], f"{path.name} line {row['line']}") for n, col in names.items()}
            labels[sys.intern(str(int(row[study])))] = pack_labels(values)
        except ValueError as err:
            c.skip(f"{path.name} line {row['line']}", str(err))
    return labels


NOT_MENTIONED = 3  # the packed value of a blank cell


def pack_labels(values: dict[str, int | None]) -> bytes:
    """CheXpert-14 values (1, 0, -1 or None) in chexbert_labels() order as one byte each."""
    return bytes(NOT_MENTIONED if v is None else v + 1 for v in values.values())


def unpack_labels(packed: bytes) -> dict[str, int]:
    """The labels a packed row mentions, in chexbert_labels() order."""
    return {n: b - 1 for n, b in zip(chexbert_labels(), packed) if b != NOT_MENTIONED}


def read(c: Collector) -> None:
    """Patient by patient (in subject order, each patient's studies in time): only one patient's
    reports are held, which is all that pairing a study with the previous one needs."""
    index = c.context.mimic()
    for record, reason in index.skipped:
        c.skip(record, reason)
    file_labels = read_labels(c)
    candidates, limits = cot_candidates(), c.config
    missing: list[tuple[str, str, str]] = []  # (study, record, reason) of the studies without a report file
    report_rules: Counter = Counter()
    pair_rules: Counter = Counter()
    labelled_here = 0

    by_subject: dict[str, list[str]] = defaultdict(list)
    for study, dicoms in index.studies.items():
        by_subject[index.images[dicoms[0]].subject_id].append(study)
    for subject, studies in sorted(by_subject.items()):
        studies.sort(key=lambda s: (index.images[index.studies[s][0]].time, s))
        reports: dict[str, tuple[str, dict[str, int]]] = {}  # study -> (cleaned FINDINGS, labels)
        for study in studies:
            path = index.report_path(subject, study)
            if path is None:
                missing.append((study, f"s{study}", f"no report file files/p{subject[:2]}/p{subject}/s{study}.txt"))
                continue
            findings = findings_section(path.read_text(encoding="utf-8", errors="replace"))
            rule = ("report without a FINDINGS section" if findings is None else
                    "FINDINGS shorter than 5 characters" if len(findings) < 5 else None)
            if rule:
                report_rules[rule] += 1
                continue
            if study in file_labels:
                labels = unpack_labels(file_labels[study])
            else:
                labels = label_report(findings)
                labelled_here += 1
            reports[study] = (clean_report(findings), labels)
        add_patient_samples(c, index, subject, studies, reports, candidates, limits, pair_rules)

    for _, record, reason in sorted(missing):
        c.skip(record, reason)
    if index.studies and len(missing) == len(index.studies):
        raise SourceError(f"{c.root}: no report files (files/pXX/pSUBJECT/sSTUDY.txt) for any study; "
                          "unpack mimic-cxr-reports.zip into this folder")
    for rule, count in (report_rules + pair_rules).items():
        c.exclude(rule, count)
    if file_labels and labelled_here:
        c.note(f"{labelled_here} studies are not in the label file: labelled by the rule-based labeler")


def add_patient_samples(c: Collector, index: MimicIndex, subject: str, studies: list[str],
                        reports: dict[str, tuple[str, dict[str, int]]], candidates, limits, excluded: Counter) -> None:
    """The three scenarios' samples of one patient's studies (in time order)."""
    for position, study in enumerate(studies):
        if study not in reports:
            continue
        report, labels = reports[study]
        dicoms = index.study_order(index.studies[study])
        ids = [index.register(c, d) for d in dicoms]
        split = index.images[dicoms[0]].split
        fields = {"findings": candidates, "positives": positive_findings(labels, candidates), "report": report}
        common = dict(split=split, patient=patient_id(subject), study=study, labels=labels, report=report)
        for i in ids:
            c.add("single_image", {**fields, "images": 1}, [(i, "current")], **common)
        # the test split: one instance of each scenario per frontal image of the study, that image first
        frontal = [i for i, d in zip(ids, dicoms) if index.images[d].view in FRONTAL]
        leads = frontal if split == "test" else ids[:1]
        if not leads:
            excluded["test multi-image and multi-study: study without a frontal image"] += 1
        orders = [[(lead, "current")] + [(i, "current") for i in ids if i != lead] for lead in leads]
        if len(ids) > limits.max_images_multi_image:
            excluded[f"multi-image: study of more than {limits.max_images_multi_image} images"] += 1
        else:
            for current in orders:
                c.add("multi_image", {**fields, "images": len(ids)}, current, **common)
        prior = studies[position - 1] if position else None
        if prior is None or prior not in reports:
            if split == "test" and len(ids) <= limits.max_images_multi_image:
                for current in orders:  # no prior study: the follow-up alone, asked as multi-image
                    c.add("multi_study", {**fields, "images": len(ids)}, current, template="multi_image", **common)
            elif prior is not None:
                excluded["multi-study: the previous study has no usable FINDINGS"] += 1
            continue
        prior_dicoms = index.study_order(index.studies[prior])
        if len(prior_dicoms) + len(dicoms) > limits.max_images_multi_study:
            excluded[f"multi-study: more than {limits.max_images_multi_study} images in the two studies"] += 1
            continue
        prior_ids = [index.register(c, d) for d in prior_dicoms]
        for current in orders:
            c.add("multi_study", {**fields, "prior_images": len(prior_ids), "prior_report": reports[prior][0],
                                  "follow_up_images": len(ids)},
                  [(i, "prior") for i in prior_ids] + current, prior_report=reports[prior][0], **common)
