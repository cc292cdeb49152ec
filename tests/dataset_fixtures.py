"""Tiny copies of every public dataset in its official layout (DATASETS.md), for the adapter tests.

Each builder writes a handful of rows and small images (DICOM where the dataset ships DICOM) under
a folder and returns it. Every fixture plants one malformed record that the adapter must report.
`leak=True` plants leaks for the leakage checks: a MIMIC patient in two splits, an MS-CXR test
image in an MS-CXR training sample.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

PATIENT_NAME = "Doe^Jane"  # written into every DICOM: it must never reach the corpus
PATIENT_TAG_ID = "SECRET-PID-0001"


# ----------------------------------------------------------------------------- files


def picture(size: tuple[int, int], seed: int) -> np.ndarray:
    """A grey radiograph-like array (height, width): a bright body with darker lungs and noise."""
    width, height = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    body = 200 - 120 * (((xx - width / 2) / (width / 2.2)) ** 2 + ((yy - height / 2) / (height / 1.8)) ** 2)
    for _ in range(4):  # a few blobs where the seed puts them, so that no two pictures look alike
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.1, 0.3) * min(width, height)
        body -= 80 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    return np.clip(body + rng.normal(0, 12, body.shape), 0, 255).astype(np.uint8)


def write_png(path: Path, size=(64, 64), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture(size, seed)).save(path)
    return path


def write_jpg(path: Path, size=(64, 80), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture(size, seed)).save(path, quality=95)
    return path


def write_mask(path: Path, size, boxes) -> Path:
    """A binary mask (255 inside) of the given pixel boxes [x1, y1, x2, y2) on a (width, height) canvas."""
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    for x1, y1, x2, y2 in boxes:
        mask[y1:y2, x1:x2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


def write_dicom(path: Path, size=(64, 64), seed=0, monochrome1=False) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_TAG_ID
    pixels = picture(size, seed).astype(np.uint16) * 16
    if monochrome1:
        pixels = 4095 - pixels
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_csv(path: Path, header, rows, gz=False, sep=",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")
    with handle as f:
        writer = csv.writer(f, delimiter=sep)
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


# ----------------------------------------------------------------------------- MIMIC-CXR family


def dicom_id(n: int) -> str:
    return f"{n:08x}-00000000-00000000-00000000-00000000"


MIMIC_SIZE = (64, 80)  # width, height of every MIMIC fixture image
MIMIC_DICOM = 20  # this image is a .dcm (the DICOM release), the others .jpg
# subject -> [(study, date, time, [(image number, view)], findings or None (no FINDINGS), split)]
MIMIC_STUDIES = {
    "10000001": [  # train; two studies on one day: StudyTime orders them (8:05 before 13:45)
        ("50000001", 21800101, "80556.875", [(1, "PA"), (2, "LATERAL")],
         "Heart size is normal. There is a small left pleural effusion.", "train"),
        ("50000002", 21800101, "134500.0", [(3, "AP"), (4, "LATERAL"), (5, "PA"), (6, "LL"), (7, "")],
         "1. Small left pleural effusion is unchanged. 2. No pneumothorax.", "train"),
        ("50000003", 21800401, "91011.0", [(n, "PA" if n == 8 else "LATERAL") for n in range(8, 14)],
         "Left pleural effusion has increased. Cardiomegaly.", "train"),
    ],
    "10000002": [  # test; the study ids do not follow time: 50000013 comes before 50000011
        ("50000012", 21890101, "120000.0", [(16, "PA")], None, "test"),
        ("50000013", 21900101, "100000.0", [(17, "PA"), (18, "LATERAL")],
         "There is mild pulmonary edema. Right basilar atelectasis.", "test"),
        ("50000011", 21900301, "100000.0", [(14, "PA"), (15, "LATERAL")],
         "Edema has improved. Right basilar atelectasis may be present.", "test"),
    ],
    "10000003": [  # validate
        ("50000021", 21850101, "70000.0", [(19, "PA")], "NL.", "validate"),
        ("50000022", 21850201, "70000.0", [(20, "PA")], "The lungs are clear.", "validate"),
    ],
}
MIMIC_LABELS = {  # study -> labels in the CheXpert file (others: the rule-based labeler)
    "50000001": {"Pleural Effusion": "1.0", "Cardiomegaly": "0.0"},
    "50000002": {"Pleural Effusion": "1.0", "Pneumothorax": "0.0"},
    "50000011": {"Atelectasis": "-1.0", "Edema": "1.0"},
    "50000022": {"No Finding": "1.0"},
}
CHEXPERT_14 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
               "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
               "Pneumothorax", "Support Devices"]


def report_text(findings: str | None) -> str:
    lines = [" FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", " ", " INDICATION:  ___ with cough", " "]
    if findings is not None:
        lines += [" FINDINGS:", " ", " " + findings, " "]
    lines += [" IMPRESSION:", " ", " Stable appearance."]
    return "\n".join(lines) + "\n"


def mimic_cxr(root: Path, leak: bool = False) -> Path:
    meta, split_rows = [], []
    for subject, studies in MIMIC_STUDIES.items():
        for study, date, time, images, findings, split in studies:
            folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
            (folder).mkdir(parents=True, exist_ok=True)
            (folder / f"s{study}.txt").write_text(report_text(findings))
            for n, view in images:
                if n == MIMIC_DICOM:  # the DICOM release's file where there is no JPG
                    write_dicom(folder / f"s{study}" / f"{dicom_id(n)}.dcm", MIMIC_SIZE, seed=n)
                else:
                    write_jpg(folder / f"s{study}" / f"{dicom_id(n)}.jpg", MIMIC_SIZE, seed=n)
                meta.append([dicom_id(n), subject, study, "CHEST (PA AND LAT)", view, MIMIC_SIZE[1], MIMIC_SIZE[0],
                             date, time, "CHEST", "", "Erect"])
                image_split = "test" if leak and study == "50000003" else split
                split_rows.append([dicom_id(n), study, subject, image_split])
    # malformed: a StudyDate that is not a date
    meta.append([dicom_id(21), "10000003", "50000023", "CHEST", "PA", 80, 64, "not-a-date", "1.0", "", "", ""])
    split_rows.append([dicom_id(21), "50000023", "10000003", "validate"])
    write_mimic_tables(root, meta, split_rows)
    label_rows = []
    for subject, studies in MIMIC_STUDIES.items():
        for study, *_ in studies:
            if study in MIMIC_LABELS:
                label_rows.append([subject, study] + [MIMIC_LABELS[study].get(n, "") for n in CHEXPERT_14])
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id"] + CHEXPERT_14, label_rows, gz=True)
    return root


def write_mimic_tables(root: Path, meta: list, split_rows: list) -> None:
    """MIMIC-CXR-JPG's metadata and split tables."""
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
               "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
               "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"], meta, gz=True)
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows,
              gz=True)


def ms_cxr(root: Path, leak: bool = False) -> Path:
    header = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width", "image_height",
              "split"]
    path = lambda n, s, st: f"files/p{s[:2]}/p{s}/s{st}/{dicom_id(n)}.jpg"  # noqa: E731
    rows = [
        [dicom_id(8), "Pleural Effusion", "Left pleural effusion", path(8, "10000001", "50000003"), 32, 40, 16, 20, 64, 80, "train"],
        [dicom_id(8), "Pleural Effusion", "Left pleural effusion", path(8, "10000001", "50000003"), 16, 20, 16, 20, 64, 80, "train"],
        [dicom_id(14), "Atelectasis", "Right basilar atelectasis", path(14, "10000002", "50000011"), 8, 48, 20, 16, 64, 80, "test"],
        [dicom_id(19), "Cardiomegaly", "Enlarged heart", path(19, "10000003", "50000021"), 20, 30, 30, 30, 64, 80, "val"],
        [dicom_id(19), "Cardiomegaly", "Bad box", path(19, "10000003", "50000021"), 20, 30, -5, 30, 64, 80, "val"],
    ]
    if leak:
        rows.append([dicom_id(14), "Edema", "Mild edema", path(14, "10000002", "50000011"), 10, 10, 40, 40, 64, 80, "train"])
    write_csv(root / "MS_CXR_Local_Alignment_v1.1.0.csv", header, rows)
    return root


def scene_graph(n: int, regions: dict, phrases: dict) -> dict:
    objects = [{"object_id": f"{dicom_id(n)}_{name}", "bbox_name": name, "name": name.capitalize(),
                "x1": 0, "y1": 0, "x2": 1, "y2": 1, "width": 1, "height": 1,
                "original_x1": b[0], "original_y1": b[1], "original_x2": b[2], "original_y2": b[3],
                "original_width": b[2] - b[0], "original_height": b[3] - b[1]} for name, b in regions.items()]
    attributes = [{"bbox_name": name, "phrases": [text], "attributes": [["nlp|yes|abnormal"]], name: True}
                  for name, text in phrases.items()]
    return {"image_id": dicom_id(n), "objects": objects, "attributes": attributes, "relationships": []}


IMAGENOME_REGIONS = {"right lung": (4, 10, 30, 70), "left lung": (34, 10, 62, 70),
                     "cardiac silhouette": (20, 40, 44, 70), "trachea": (-5, -2, 40, 20),  # clamped to the image
                     "left arm": (0, 0, 10, 10)}  # not one of the 29 regions


def imagenome(root: Path) -> Path:
    silver = root / "silver_dataset"
    index_header = ["", "subject_id", "study_id", "dicom_id", "path", "ViewPosition"]
    row = lambda i, s, st, n: [i, s, st, dicom_id(n), f"files/p{s[:2]}/p{s}/s{st}/{dicom_id(n)}.dcm", "PA"]  # noqa: E731
    write_csv(silver / "splits" / "train.csv", index_header,
              [row(0, "10000001", "50000001", 1), row(1, "10000001", "50000001", 2),
               row(2, "10000001", "50000002", 3), row(3, "10000001", "50000002", 4)])
    write_csv(silver / "splits" / "valid.csv", index_header, [row(0, "10000003", "50000022", 20)])
    write_csv(silver / "splits" / "test.csv", index_header, [row(0, "10000002", "50000011", 15)])
    write_csv(silver / "splits" / "images_to_avoid.csv", ["subject_id", "study_id", "dicom_id", "path"],
              [["10000001", "50000001", dicom_id(2), ""]])
    phrases = {"left lung": "small left pleural effusion", "cardiac silhouette": "heart size is normal"}
    for n in (1, 3, 20, 15):  # 2 is to be avoided; 4 has no scene graph (reported)
        write_json(silver / "scene_graph" / f"{dicom_id(n)}_SceneGraph.json",
                   scene_graph(n, IMAGENOME_REGIONS, phrases))
    return root


def mimic_cxr_vqa(root: Path) -> Path:
    folder = root / "MIMIC-Ext-MIMIC-CXR-VQA" / "dataset"
    q = lambda split, n, s, st, question, answer: {  # noqa: E731
        "split": split, "idx": n, "subject_id": int(s), "study_id": int(st), "image_id": dicom_id(n),
        "image_path": f"p{s[:2]}/p{s}/s{st}/{dicom_id(n)}.jpg", "question": question, "semantic_type": "verify",
        "content_type": "presence", "template": "", "template_program": "program_1", "template_arguments": {},
        "answer": answer}
    write_json(folder / "train.json", [
        q("train", 1, "10000001", "50000001", "is there pleural effusion in the left lung?", ["yes"]),
        q("train", 3, "10000001", "50000002", "list all abnormalities.", ["lung opacity", "pleural effusion"]),
        q("train", 3, "10000001", "50000002", "list all devices.", []),  # no answer: left out
        {"split": "train", "image_id": dicom_id(3)},  # malformed: no question
    ])
    write_json(folder / "valid.json", [q("valid", 20, "10000003", "50000022", "is the heart enlarged?", ["no"])])
    write_json(folder / "test.json", [q("test", 15, "10000002", "50000011", "is there edema?", ["yes"])])
    return root


def mimic_diff_vqa(root: Path) -> Path:
    labels = [""] * 14
    write_csv(root / "mimic_all.csv", ["subject_id", "study_id"] + CHEXPERT_14 +
              ["dicom_id", "view", "split", "study_date", "study_order"], [
        ["10000001", "50000001"] + labels + [dicom_id(1), "postero-anterior", "train", 21800101, 1],
        ["10000001", "50000002"] + labels + [dicom_id(3), "antero-posterior", "train", 21800101, 2],
        ["10000002", "50000013"] + labels + [dicom_id(17), "postero-anterior", "test", 21900101, 2],
        ["10000002", "50000011"] + labels + [dicom_id(14), "postero-anterior", "test", 21900301, 3],
        ["10000003", "50000022"] + labels + [dicom_id(20), "postero-anterior", "validate", 21850201, 2],
    ])
    write_csv(root / "mimic_pair_questions.csv",
              ["study_id", "subject_id", "ref_id", "question_type", "question", "answer", "split"], [
        ["50000002", "10000001", "50000001", "difference", "what has changed compared to the reference image?",
         "nothing has changed.", "train"],
        ["50000002", "10000001", "50000001", "abnormality", "what abnormalities are seen in this image?",
         "pleural effusion", "train"],
        ["50000011", "10000002", "50000013", "difference", "what has changed compared to the reference image?",
         "the main image has less edema.", "test"],
        ["50000022", "10000003", "50000021", "view", "which view is this image taken?", "PA view", "val"],
        ["50000022", "10000003", "50000021", "view", "is this PA view?", "yes", "holdout"],  # malformed split
    ])
    return root


def radialog(root: Path) -> Path:
    image = lambda n, s, st: f"files/p{s[:2]}/p{s}/s{st}/{dicom_id(n)}.jpg"  # noqa: E731
    turn = lambda who, text: {"from": who, "value": text}  # noqa: E731
    write_json(root / "mimic_cxr_instruct_llava_v2.json", [
        {"id": dicom_id(1), "image": image(1, "10000001", "50000001"), "task_type": "RG",
         "conversations": [turn("human", "<image>\nWrite the report."), turn("gpt", "No acute findings.")]},
        {"id": "rr1", "image": "restruct/img1.png", "task_type": "RSQA",
         "conversations": [turn("human", "<image>\nIs there a fracture?"), turn("gpt", "No.")]},
        {"id": dicom_id(1), "image": image(1, "10000001", "50000001"), "task_type": "EL",
         "conversations": [turn("human", "<image>\nExplain the findings in easy language."),
                           turn("gpt", "There is a little fluid around the left lung.")]},
        {"id": dicom_id(3), "image": [image(3, "10000001", "50000002")], "task_type": "CPbQA",
         "conversations": [turn("human", "<image>\nIs there pleural effusion?"), turn("gpt", "Yes."),
                           turn("human", "Which side?"), turn("gpt", "The left side.")]},
        {"id": dicom_id(14), "image": image(14, "10000002", "50000011"), "task_type": "CPaQA",
         "conversations": [turn("human", "<image>\nList the findings."), turn("gpt", "Edema, atelectasis.")]},
        {"id": dicom_id(3), "image": image(3, "10000001", "50000002"), "task_type": "SU",  # malformed: 3 turns
         "conversations": [turn("human", "<image>\nSummarise."), turn("gpt", "Effusion."), turn("human", "And?")]},
    ])
    return root


# ----------------------------------------------------------------------------- image understanding


VINDR_LABELS = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
                "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
                "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
                "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD",
                "Lung tumor", "Pneumonia", "Tuberculosis"]


def vindr_cxr(root: Path) -> Path:
    v1, v2, v3 = "a" * 32, "b" * 32, "c" * 32
    write_dicom(root / "train" / f"{v1}.dicom", (96, 128), seed=1, monochrome1=True)
    write_dicom(root / "train" / f"{v2}.dicom", (96, 128), seed=2)
    write_dicom(root / "test" / f"{v3}.dicom", (96, 128), seed=3)
    ann = ["image_id", "rad_ID", "class_name", "x_min", "y_min", "x_max", "y_max"]
    write_csv(root / "annotations" / "annotations_train.csv", ann, [
        [v1, "R1", "Cardiomegaly", 30, 60, 70, 90], [v1, "R2", "Cardiomegaly", 32, 62, 72, 92],  # merged
        [v1, "R3", "Aortic enlargement", 50, 30, 60, 45],
        [v1, "R3", "Bogus finding", 1, 1, 5, 5],  # malformed
        [v2, "R1", "No finding", "", "", "", ""], [v2, "R2", "No finding", "", "", "", ""],
    ])
    write_csv(root / "annotations" / "annotations_test.csv", ann, [[v3, "R8", "Nodule/Mass", 10, 20, 20, 30]])
    labels_header = ["image_id", "rad_id"] + VINDR_LABELS + ["Other diseases", "No finding"]
    row = lambda image, rad, positive: [image, rad] + [int(n in positive) for n in VINDR_LABELS] + [0, int(not positive)]  # noqa: E731
    write_csv(root / "annotations" / "image_labels_train.csv", labels_header, [
        row(v1, "R1", {"Cardiomegaly", "Aortic enlargement"}), row(v1, "R2", {"Cardiomegaly"}), row(v1, "R3", {"Aortic enlargement", "COPD"}),
        row(v2, "R1", set()), row(v2, "R2", set()), row(v2, "R3", set()),
    ])
    write_csv(root / "annotations" / "image_labels_test.csv", ["image_id", "rad_ID"] + VINDR_LABELS + ["Other disease", "No finding"],
              [row(v3, "R8", {"Nodule/Mass", "Lung tumor"})])
    return root


def chestx_ray14(root: Path) -> Path:
    header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
    row = lambda name, labels, pid: [name, labels, 0, pid, 50, "M", "PA", 2500, 2048, 0.14, 0.14]  # noqa: E731
    write_csv(root / "Data_Entry_2017_v2020.csv", header, [
        row("00000001_000.png", "Cardiomegaly|Effusion", 1), row("00000002_000.png", "No Finding", 2),
        row("00000003_000.png", "Atelectasis", 3), row("00000004_000.png", "Mass|Infiltration", 4),
        row("00000005_000.png", "Bogus", 5),  # malformed
    ])
    with open(root / "BBox_List_2017.csv", "w") as f:
        f.write("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
        f.write("00000001_000.png,Cardiomegaly,20,30,40,20\n00000001_000.png,Effusion,40,50,16,10\n")
        f.write("00000003_000.png,Atelectasis,8,40,12,10\n00000004_000.png,Infiltrate,10,10,20,20\n")
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000002_000.png\n00000004_000.png\n00000005_000.png\n")
    (root / "test_list.txt").write_text("00000003_000.png\n")
    for n in range(1, 6):
        write_png(root / "images_001" / "images" / f"0000000{n}_000.png", (64, 64), seed=n)
    return root


def chestx_det10(root: Path) -> Path:
    write_json(root / "train.json", [
        {"file_name": "36200.png", "syms": ["Effusion", "Nodule"], "boxes": [[40, 50, 60, 62], [10, 12, 18, 20]]},
        {"file_name": "36201.png", "syms": [], "boxes": []},
        {"file_name": "36202.png", "syms": ["Mass"], "boxes": []},  # malformed: a finding without its box
    ])
    write_json(root / "test.json", [{"file_name": "36300.png", "syms": ["Fracture"], "boxes": [[5, 5, 15, 25]]}])
    for name in ("36200", "36201", "36202"):
        write_png(root / "train_data" / f"{name}.png", (64, 64), seed=int(name))
    write_png(root / "test_data" / "36300.png", (64, 64), seed=36300)
    return root


def jsrt(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("JPCLN001", "JPCLN002", "JPCNN001"):
        (rng.integers(0, 4096, size=(2048, 2048)).astype(">u2")).tofile(root / f"{name}.IMG")
    (root / "CLNDAT_EN.txt").write_text(
        "JPCLN001.IMG\t3\t14\t53\tmale\t1634\t692\tmalignant\tl.upper lobe\tlung cancer\n"
        "JPCLN002.IMG\t5\t35\t60\tfemale\t500\t1000\tbenign\tr.lower lobe\thamartoma\n"
        "JPCLN003.IMG\t4\tabc\t61\tmale\t300\t300\tbenign\tr.upper lobe\tgranuloma\n")  # malformed size
    (root / "CNNDAT_EN.TXT").write_text("JPCNN001.IMG   43  male  non-nodule\n")
    return root


def relative_rle(mask: np.ndarray) -> str:
    """The SIIM relative RLE of a mask (column-major runs; each start counts from the last run's end)."""
    flat = mask.T.flatten().astype(int)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [0]])))
    starts, ends = edges[::2], edges[1::2]
    out, last = [], 0
    for s, e in zip(starts, ends):
        out += [int(s - last), int(e - s)]
        last = e
    return " ".join(map(str, out))


SIIM_BOXES = [(10, 8, 22, 30), (40, 40, 52, 56)]  # two pneumothorax instances of image s1


def siim(root: Path) -> Path:
    for name, seed in (("1.2.3.1", 1), ("1.2.3.2", 2)):
        write_dicom(root / "dicom-images-train" / f"study{seed}" / f"series{seed}" / f"{name}.dcm", (64, 64), seed=seed)
    rows = []
    for x1, y1, x2, y2 in SIIM_BOXES:
        mask = np.zeros((64, 64), dtype=bool)
        mask[y1:y2, x1:x2] = True
        rows.append(["1.2.3.1", relative_rle(mask)])
    rows += [["1.2.3.2", "-1"], ["1.2.3.3", "5 10 3"]]  # the last is malformed (odd number of values)
    write_csv(root / "train-rle.csv", ["ImageId", " EncodedPixels"], rows)
    return root


def rsna(root: Path) -> Path:
    for pid in ("r1", "r2", "r3"):
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", (64, 64), seed=len(pid) + ord(pid[-1]))
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], [
        ["r1", 10, 20, 15, 25, 1], ["r1", 40, 22, 14, 20, 1], ["r2", "", "", "", "", 0], ["r3", "", "", "", "", 0],
        ["r4", "", "", "", "", "x"],  # malformed Target
    ])
    write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], [
        ["r1", "Lung Opacity"], ["r1", "Lung Opacity"], ["r2", "Normal"], ["r3", "No Lung Opacity / Not Normal"],
    ])
    return root


LUNGS = [(4, 4, 14, 28), (18, 4, 28, 28)]  # two lung regions of a 32 x 32 mask (image-left = right lung)


def covid19_radiography(root: Path) -> Path:
    base = root / "COVID-19_Radiography_Dataset"
    write_png(base / "COVID" / "images" / "COVID-1.png", (48, 48), seed=1)
    write_mask(base / "COVID" / "masks" / "COVID-1.png", (32, 32), LUNGS)  # smaller than the image
    write_png(base / "Normal" / "images" / "Normal-1.png", (48, 48), seed=2)
    write_mask(base / "Normal" / "masks" / "Normal-1.png", (48, 48), [(6, 6, 21, 42), (27, 6, 42, 42)])
    write_png(base / "Viral Pneumonia" / "images" / "Viral Pneumonia-1.png", (48, 48), seed=3)
    write_mask(base / "Viral Pneumonia" / "masks" / "Viral Pneumonia-1.png", (48, 48),
               [(2, 2, 6, 6), (10, 2, 14, 6), (20, 2, 24, 6), (30, 2, 34, 6)])  # 4 regions: left out
    write_png(base / "Lung_Opacity" / "images" / "Lung_Opacity-1.png", (48, 48), seed=4)  # no mask: reported
    return root


def covid_qu_ex(root: Path) -> Path:
    base = root / "Infection Segmentation Data" / "Infection Segmentation Data"
    items = [("Train", "COVID-19", "covid_1.png", [(20, 30, 32, 44)]), ("Train", "Normal", "normal_1.png", []),
             ("Val", "COVID-19", "covid_2.png", [(5, 5, 15, 20)]), ("Test", "Non-COVID", "noncovid_1.png", [])]
    for seed, (split, group, name, infection) in enumerate(items):
        folder = base / split / group
        write_png(folder / "images" / name, (64, 64), seed=100 + seed)
        write_mask(folder / "lung masks" / name, (64, 64), [(4, 4, 28, 60), (36, 4, 60, 60)])
        write_mask(folder / "infection masks" / name, (64, 64), infection)
    write_png(base / "Train" / "COVID-19" / "images" / "covid_9.png", (64, 64), seed=109)  # no infection mask
    return root


def qata_cov19(root: Path, qu_ex_root: Path | None = None) -> Path:
    base = root / "QaTa-COV19-v2"
    for split, name, seed in (("Train Set", "covid_10.png", 201), ("Test Set", "covid_11.png", 202)):
        write_png(base / split / "Images" / name, (64, 64), seed=seed)
        write_mask(base / split / "Ground-truths" / f"mask_{name}", (64, 64), [(30, 30, 50, 50)])
    write_png(base / "Train Set" / "Images" / "covid_12.png", (64, 64), seed=203)  # no mask: reported
    if qu_ex_root is not None:  # the same picture as COVID-QU-Ex's covid_1, at another size: left out
        source = qu_ex_root / "Infection Segmentation Data" / "Infection Segmentation Data" / "Train" / "COVID-19"
        Image.open(source / "images" / "covid_1.png").resize((96, 96)).save(base / "Train Set" / "Images" / "covid_13.png")
        write_mask(base / "Train Set" / "Ground-truths" / "mask_covid_13.png", (96, 96), [(30, 45, 48, 66)])
    return root


def brax(root: Path) -> Path:
    header = ["PatientID", "DicomPath", "PngPath", "ViewPosition"] + CHEXPERT_14
    def row(pid, n, labels, png=True):
        rel = f"id_{pid}/Study_{n}/Series_{n}/image-{n}"
        if png:
            write_png(root / "images" / f"{rel}.png", (48, 64), seed=n)
        write_dicom(root / "Anonymized_DICOMs" / f"{rel}.dcm", (48, 64), seed=n)
        return [pid, f"Anonymized_DICOMs/{rel}.dcm", f"images/{rel}.png", "PA"] + [labels.get(k, "") for k in CHEXPERT_14]
    write_csv(root / "master_spreadsheet_update.csv", header, [
        row("P1", 1, {"Cardiomegaly": "1", "Edema": "-1"}), row("P2", 2, {"No Finding": "1"}, png=False),
        row("P3", 3, {"Pneumonia": "2"}),  # malformed label value
    ])
    return root


CORRUPT_JPEG = "CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg"


def chexpert(root: Path) -> Path:
    base = root / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + [
        "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
        "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
        "Fracture", "Support Devices"]
    def row(split, patient, study, view, labels):
        rel = f"CheXpert-v1.0-small/{split}/{patient}/{study}/{view}.jpg"
        write_jpg(root / rel, (40, 48), seed=len(rel))
        return [rel, "Female", 60, "Frontal", "PA"] + [labels.get(k, "") for k in header[5:]]
    write_csv(base / "train.csv", header, [
        row("train", "patient00001", "study1", "view1_frontal", {"Cardiomegaly": "1.0", "Edema": "-1.0"}),
        row("train", "patient00002", "study1", "view1_frontal", {"No Finding": "1.0"}),
        row("train", "patient00003", "study1", "view1_frontal", {"Edema": "yes"}),  # malformed
        row("train", "patient00004", "study1", "view1_frontal", {"Edema": "1.0"}),  # its JPEG is corrupt
    ])
    (root / CORRUPT_JPEG).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    write_csv(base / "valid.csv", header, [
        row("valid", "patient64541", "study1", "view1_frontal", {"Pleural Effusion": "1.0"})])
    return base


def slake(root: Path) -> Path:
    base = root / "Slake1.0"
    write_jpg(base / "imgs" / "xmlab1" / "source.jpg", (64, 64), seed=1)
    write_jpg(base / "imgs" / "xmlab2" / "source.jpg", (64, 64), seed=2)
    q = lambda i, img, question, answer, lang="en", modality="X-Ray", kind="CLOSED": {  # noqa: E731
        "img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": question, "answer": answer,
        "q_lang": lang, "location": "Lung", "modality": modality, "answer_type": kind, "base_type": "vqa",
        "content_type": "Abnormality", "triple": ["vhead", "_", "_"], "qid": i}
    write_json(base / "test.json", [
        q(1, 1, "Does the picture contain lung?", "Yes"), q(2, 1, "Is the lung healthy?", "No"),
        q(3, 1, "这张图片包含肺吗?", "是的", lang="zh"), q(4, 2, "Is this a CT?", "Yes", modality="CT"),
        q(5, 1, "What is abnormal?", "Nodule", kind="OPEN"),
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "No answer?"},  # malformed
    ])
    return root


def all_sources(root: Path, leak: bool = False) -> dict[str, Path]:
    """Every dataset's fixture under root; {name: folder} as `--source` takes them."""
    mimic_root = root / "mimic_cxr"
    sources = {"mimic_cxr": mimic_cxr(mimic_root, leak=leak)}
    builders = {"ms_cxr": lambda p: ms_cxr(p, leak=leak), "imagenome": imagenome, "mimic_cxr_vqa": mimic_cxr_vqa,
                "mimic_diff_vqa": mimic_diff_vqa, "radialog": radialog, "vindr_cxr": vindr_cxr,
                "chestx_ray14": chestx_ray14, "chestx_det10": chestx_det10, "jsrt": jsrt, "siim": siim, "rsna": rsna,
                "covid19_radiography": covid19_radiography, "covid_qu_ex": covid_qu_ex,
                "qata_cov19": lambda p: qata_cov19(p, root / "covid_qu_ex"), "brax": brax, "chexpert": chexpert,
                "slake": slake}
    for name, build in builders.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        sources[name] = build(folder)
    return sources


# ----------------------------------------------------------------------------- MIMIC-CXR at scale

SCALE_SENTENCES = (
    "Heart size is normal.", "The cardiomediastinal silhouette is within normal limits.",
    "There is a small left pleural effusion.", "No pneumothorax is seen.", "Mild pulmonary edema.",
    "Right basilar atelectasis.", "The lungs are clear without focal consolidation.",
    "Moderate cardiomegaly is stable.", "A right internal jugular catheter ends in the low SVC.",
    "There is no pleural effusion.", "Bibasilar opacities may reflect atelectasis or pneumonia.",
    "Osseous structures are unremarkable.",
)


def mimic_cxr_at_scale(root: Path, studies: int, seed: int = 0, image_size=(16, 20)) -> Path:
    """A MIMIC-CXR-JPG folder of `studies` studies in the official layout, for scale measurements:
    1 to 5 studies per patient in time order, 1 to 4 images a study (about 1.7, as MIMIC-CXR's
    377,110 images of 227,835 studies), reports with FINDINGS of 2 to 6 sentences (one in five
    without), labels for most studies, patients split 98 / 1 / 1 and one tiny JPEG copied to
    every image path."""
    import io

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(picture(image_size, seed)).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    meta, split_rows, label_rows = [], [], []
    made, subject, image = 0, 10000000, 0
    while made < studies:
        subject += 1
        split = str(rng.choice(["train", "validate", "test"], p=[0.98, 0.01, 0.01]))
        folder = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}"
        folder.mkdir(parents=True, exist_ok=True)
        for visit in range(min(int(rng.integers(1, 6)), studies - made)):
            made += 1
            study = str(50000000 + made)
            sentences = rng.choice(len(SCALE_SENTENCES), size=int(rng.integers(2, 7)), replace=False)
            findings = " ".join(SCALE_SENTENCES[i] for i in sentences) if rng.random() >= 0.2 else None
            (folder / f"s{study}.txt").write_text(report_text(findings))
            (folder / f"s{study}").mkdir(exist_ok=True)
            views = ["PA", "LATERAL", "AP", "LL"][:int(rng.choice([1, 2, 3, 4], p=[0.42, 0.5, 0.05, 0.03]))]
            for view in views:
                image += 1
                (folder / f"s{study}" / f"{dicom_id(image)}.jpg").write_bytes(jpeg)
                meta.append([dicom_id(image), subject, study, "CHEST (PA AND LAT)", view, image_size[1],
                             image_size[0], 21800101 + visit * 100, f"{80000 + image % 1000}.0", "CHEST", "", "Erect"])
                split_rows.append([dicom_id(image), study, subject, split])
            if rng.random() < 0.95:
                label_rows.append([subject, study] + [str(rng.choice(["1.0", "0.0", "-1.0", ""]))
                                                      for _ in CHEXPERT_14])
    write_mimic_tables(root, meta, split_rows)
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id"] + CHEXPERT_14, label_rows, gz=True)
    return root
