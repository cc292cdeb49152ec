"""QaTa-COV19: COVID-19 infection grounding (DATASETS.md section 12).

QaTa-COV19-v2/{Train Set,Test Set}/{Images,Ground-truths}/: the mask of Images/<name> is
Ground-truths/mask_<name>; each mask region becomes a box (the paper's rule). Images that are
also in COVID-QU-Ex (the same picture by difference hash) are left out, the paper's rule; that
needs the covid_qu_ex source, and without it the rule is not applied and the manifest says so.
"""

from __future__ import annotations

from m4cxr.boxes import mask_to_boxes
from m4cxr.data.images import difference_hash, read_image, read_mask
from m4cxr.data.sources.common import Collector, SourceError, detection_samples

DATASET = "qata_cov19"
TASKS = ("finding_grounding", "grounded_finding", "abnormality_detection")
FINDING = "COVID-19"
SPLITS = {"Train Set": "train", "Test Set": "test"}


def read(c: Collector) -> None:
    root = c.root / "QaTa-COV19-v2" if (c.root / "QaTa-COV19-v2").is_dir() else c.root
    if not any((root / s / "Images").is_dir() for s in SPLITS):
        raise SourceError(f"{c.root}: no 'QaTa-COV19-v2/{{Train Set,Test Set}}/Images' folders")
    known = c.context.covid_qu_ex_hashes()
    if known is None:
        c.note("no covid_qu_ex source: the overlap with COVID-QU-Ex is not removed")
    for folder, split in SPLITS.items():
        for path in sorted((root / folder / "Images").glob("*.png")):
            record = f"{folder}/Images/{path.name}"
            patient = f"{DATASET}_{path.stem}"
            try:
                if known is not None and difference_hash(read_image(path)) in known:
                    c.exclude("also in COVID-QU-Ex")
                    continue
                mask_path = root / folder / "Ground-truths" / f"mask_{path.name}"
                if not mask_path.exists():
                    raise ValueError(f"no mask Ground-truths/mask_{path.name}")
                image = c.image(patient, path, patient=patient, split=split)
                boxes = mask_to_boxes(read_mask(mask_path, c.size(image)))
            except ValueError as err:
                c.skip(record, str(err))
                continue
            detection_samples(c, image, {FINDING: boxes}, [FINDING], TASKS, split=split, patient=patient)
