"""COVID-QU-Ex: COVID-19 infection grounding and lung grounding (DATASETS.md section 11).

Infection Segmentation Data/Infection Segmentation Data/{Train,Val,Test}/{COVID-19,Non-COVID,Normal}/
{images, lung masks, infection masks}/ (the top folder may be single); masks share their image's
file name. Infection masks give the COVID-19 boxes, lung masks the organ boxes, one box per mask
region (the paper's rule). The split is the Train/Val/Test folder.
"""

from __future__ import annotations

from pathlib import Path

from m4cxr.boxes import mask_to_boxes
from m4cxr.data.images import difference_hash, read_image, read_mask
from m4cxr.data.sources.common import (
    Collector, SourceError, detection_samples, lung_boxes, organ_grounding_samples, split_name,
)

DATASET = "covid_qu_ex"
TASKS = ("finding_grounding", "grounded_finding", "abnormality_detection")
FINDING = "COVID-19"


def infection_folder(root: Path) -> Path:
    for folder in (root / "Infection Segmentation Data" / "Infection Segmentation Data",
                   root / "Infection Segmentation Data", root):
        if any((folder / s).is_dir() for s in ("Train", "Val", "Test")):
            return folder
    raise SourceError(f"{root}: no 'Infection Segmentation Data/Infection Segmentation Data/{{Train,Val,Test}}' folders")


def image_paths(root: Path):
    folder = infection_folder(root)
    for split_folder in ("Train", "Val", "Test"):
        for group in ("COVID-19", "Non-COVID", "Normal"):
            for path in sorted((folder / split_folder / group / "images").glob("*.png")):
                yield split_folder, group, path


def image_hashes(root: Path) -> set[str]:
    """Difference hashes of every image (QaTa-COV19 leaves out its copies of these)."""
    return {difference_hash(read_image(path)) for _, _, path in image_paths(root)}


def read(c: Collector) -> None:
    for split_folder, group, path in image_paths(c.root):
        split, record = split_name(split_folder, str(path)), f"{split_folder}/{group}/images/{path.name}"
        patient = f"{DATASET}_{group}_{path.stem}".replace(" ", "_")
        image = c.image(patient, path, patient=patient, split=split)
        folder = path.parent.parent
        try:
            size = c.size(image)
            infection = folder / "infection masks" / path.name
            lungs = folder / "lung masks" / path.name
            if group == "COVID-19" and not infection.exists():
                raise ValueError(f"no infection mask {group}/infection masks/{path.name}")
            found = mask_to_boxes(read_mask(infection, size)) if infection.exists() else []
            organs = lung_boxes(mask_to_boxes(read_mask(lungs, size)), size[0]) if lungs.exists() else {}
        except ValueError as err:
            c.skip(record, str(err))
            continue
        common = dict(split=split, patient=patient)
        detection_samples(c, image, {FINDING: found}, [FINDING], TASKS, **common)
        organ_grounding_samples(c, image, organs, **common)
