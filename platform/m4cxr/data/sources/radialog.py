"""RaDialog Instruct (v1.1.0): visual instruction following on MIMIC-CXR images (DATASETS.md
section 17).

mimic_cxr_instruct_llava_v2.json is a LLaVA-format list: id, image (a path or a list of paths
relative to the MIMIC-CXR-JPG root), conversations ([{"from": "human"|"gpt", "value"}], possibly
several turns) and task_type. The paper's rules: no report generation (task RG) and MIMIC-CXR
images only. There is no split field: each image takes its MIMIC-CXR split. Images come from the
mimic_cxr source.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from m4cxr.data.sources.common import Collector, SourceError, find_file, read_json
from m4cxr.data.sources.mimic_cxr import patient_id

DATASET = "radialog"
EXCLUDED_TASKS = ("RG",)


def turns_of(conversations) -> list[tuple[str, str]]:
    """[(question, answer), ...] from LLaVA turns, the <image> token taken out."""
    if not isinstance(conversations, list) or len(conversations) < 2 or len(conversations) % 2:
        raise ValueError("conversations must be an even, non-empty list of human/gpt turns")
    pairs = []
    for human, gpt in zip(conversations[::2], conversations[1::2]):
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise ValueError(f"turns must alternate human, gpt; got {human.get('from')!r}, {gpt.get('from')!r}")
        question = str(human["value"]).replace("<image>", "").strip()
        answer = str(gpt["value"]).strip()
        if not question or not answer:
            raise ValueError("an empty turn")
        pairs.append((question, answer))
    return pairs


def read(c: Collector) -> None:
    path = find_file(c.root, "mimic_cxr_instruct_llava_v2.json", "mimic_cxr_instruct_llava.json")
    records = read_json(path)
    if not isinstance(records, list):
        raise SourceError(f"{path}: expected a JSON list of conversations")
    index = c.context.mimic(needed_by=DATASET)
    for n, rec in enumerate(records):
        record = f"{path.name}[{n}]"
        if str(rec.get("task_type", "")).upper() in EXCLUDED_TASKS:
            c.exclude("report generation (task RG)")
            continue
        try:
            images = rec["image"] if isinstance(rec["image"], list) else [rec["image"]]
            if not images or not all(str(p).startswith("files/") for p in images):
                c.exclude("image not from MIMIC-CXR")
                continue
            if len(images) != 1:
                c.exclude("several images in one conversation")
                continue
            dicom = PurePosixPath(str(images[0])).stem
            if dicom not in index.images:
                raise ValueError(f"image {images[0]!r} is not in the MIMIC-CXR-JPG metadata")
            pairs = turns_of(rec["conversations"])
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            c.skip(record, str(err) if isinstance(err, ValueError) else f"malformed conversation: {err!r}")
            continue
        image = index.register(c, dicom)
        mimic = index.images[dicom]
        (question, answer), follow_ups = pairs[0], pairs[1:]
        c.add("visual_instruction_following", {"question": question, "answer": answer}, [(image, "current")],
              split=mimic.split, patient=patient_id(mimic.subject_id), study=mimic.study_id, follow_ups=follow_ups)
