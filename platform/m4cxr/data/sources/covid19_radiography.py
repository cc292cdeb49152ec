"""COVID-19 Radiography Database: disease classification and lung grounding (DATASETS.md section 10).

COVID-19_Radiography_Dataset/{COVID,Lung_Opacity,Normal,Viral Pneumonia}/{images,masks}/<name>.png:
the class is the folder; a lung mask has its image's file name (masks may be smaller: they are
resized to the image). Each mask region becomes a box (the paper's mask rule) and images whose
mask has more than three regions are left out (the paper's rule). There is no official split:
every image is a training image.
"""

from __future__ import annotations

from m4cxr.boxes import mask_to_boxes
from m4cxr.data.images import read_mask
from m4cxr.data.sources.common import (
    Collector, SourceError, classification_sample, lung_boxes, organ_grounding_samples,
)

DATASET = "covid19_radiography"
CLASSES = {"COVID": "COVID-19", "Lung_Opacity": "Lung Opacity", "Viral Pneumonia": "Viral Pneumonia", "Normal": None}
LABELS = ("COVID-19", "Lung Opacity", "Viral Pneumonia")
MAX_REGIONS = 3


def read(c: Collector) -> None:
    root = c.root / "COVID-19_Radiography_Dataset" if (c.root / "COVID-19_Radiography_Dataset").is_dir() else c.root
    folders = [name for name in CLASSES if (root / name / "images").is_dir()]
    if not folders:
        raise SourceError(f"{c.root}: none of the class folders {list(CLASSES)} with images/ inside")
    for folder in folders:
        for path in sorted((root / folder / "images").glob("*.png")):
            record = f"{folder}/images/{path.name}"
            patient = f"{DATASET}_{path.stem.replace(' ', '_')}"
            image = c.image(patient, path, patient=patient, split="train")
            mask_path = root / folder / "masks" / path.name
            try:
                width, height = c.size(image)
                regions = mask_to_boxes(read_mask(mask_path, (width, height))) if mask_path.exists() else None
            except ValueError as err:
                c.skip(record, str(err))
                continue
            if regions is not None and len(regions) > MAX_REGIONS:
                c.exclude(f"lung mask of more than {MAX_REGIONS} regions")
                continue
            common = dict(split="train", patient=patient)
            label = CLASSES[folder]
            classification_sample(c, image, {label: 1} if label else {}, LABELS, **common)
            if regions is None:
                c.skip(record, f"no mask {folder}/masks/{path.name}: no organ samples")
                continue
            organ_grounding_samples(c, image, lung_boxes(regions, width), **common)
