"""Bounding boxes: pixels <-> the "[x1,y1,x2,y2]" text (integers 0..100) the model reads and writes.

Boxes in text are relative to the pixels the model sees. Two frames are supported:
- "resize" (default): the whole image is resized to the encoder's square input, so a coordinate
  is 100 * x / width (or y / height);
- "center_crop" (the authors' convention): shortest-edge resize then centre crop, so a
  coordinate is 100 * (x - crop offset) / short side, clipped to 0..100.

Also here: IoU, the paper's preprocessing rules (VinDr merge, JSRT circle -> box,
mask -> one box per connected region), and tolerant parsing of model output.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

Box = tuple[float, float, float, float]  # x1, y1, x2, y2

NUMBER = r"-?\d+(?:\.\d+)?"
BOX_PATTERN = re.compile(
    rf"\[\s*({NUMBER})\s*,\s*({NUMBER})\s*,\s*({NUMBER})\s*,\s*({NUMBER})\s*\]"
)


def to_relative(box: Sequence[float], width: int, height: int, convention: str = "resize") -> tuple[int, int, int, int]:
    """Pixel box of an image of (width, height) -> integer 0..100 box in the model's frame."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if convention == "resize":
        rel = (100 * x1 / width, 100 * y1 / height, 100 * x2 / width, 100 * y2 / height)
    elif convention == "center_crop":
        short = min(width, height)
        ox, oy = (width - short) / 2, (height - short) / 2
        rel = (100 * (x1 - ox) / short, 100 * (y1 - oy) / short,
               100 * (x2 - ox) / short, 100 * (y2 - oy) / short)
    else:
        raise ValueError(f"unknown box convention {convention!r}; use 'resize' or 'center_crop'")
    return tuple(int(min(100, max(0, round(v)))) for v in rel)  # type: ignore[return-value]


def to_pixels(box: Sequence[float], width: int, height: int, convention: str = "resize") -> Box:
    """Integer 0..100 box in the model's frame -> pixel box of the original image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if convention == "resize":
        return (x1 * width / 100, y1 * height / 100, x2 * width / 100, y2 * height / 100)
    if convention == "center_crop":
        short = min(width, height)
        ox, oy = (width - short) / 2, (height - short) / 2
        return (x1 * short / 100 + ox, y1 * short / 100 + oy, x2 * short / 100 + ox, y2 * short / 100 + oy)
    raise ValueError(f"unknown box convention {convention!r}; use 'resize' or 'center_crop'")


def format_box(box: Sequence[int]) -> str:
    return "[" + ",".join(str(int(v)) for v in box) + "]"


def format_boxes(boxes: Iterable[Sequence[int]]) -> str:
    return ", ".join(format_box(b) for b in boxes)


def _valid(box: tuple[float, ...]) -> bool:
    x1, y1, x2, y2 = box
    return all(0 <= v <= 100 for v in box) and x1 < x2 and y1 < y2


def parse_box(text: str | None) -> tuple[int, int, int, int] | None:
    """The first well-formed box in model output, or None when there is none.

    Tolerates spaces and decimals ("[ 12, 30.0 ,40,55 ]"); a box outside 0..100 or with
    x1 >= x2 or y1 >= y2 is malformed.
    """
    boxes = parse_boxes(text)
    return boxes[0] if boxes else None


def parse_boxes(text: str | None) -> list[tuple[int, int, int, int]]:
    """Every well-formed box in model output, in order (malformed ones are skipped)."""
    if not text:
        return []
    out = []
    for match in BOX_PATTERN.finditer(text):
        box = tuple(float(g) for g in match.groups())
        if _valid(box):
            out.append(tuple(int(round(v)) for v in box))
    return out  # type: ignore[return-value]


def parse_findings_with_boxes(text: str | None) -> list[tuple[str, tuple[int, int, int, int] | None]]:
    """"Cardiomegaly [30,40,70,80], Pleural Effusion [..]." -> [(name, box), ...]."""
    if not text:
        return []
    out = []
    for part in re.split(r"(?<=\])\s*[,;]\s*", text.strip().rstrip(".")):
        match = BOX_PATTERN.search(part)
        name = BOX_PATTERN.sub("", part).strip(" ,.;")
        if name:
            out.append((name, parse_box(match.group(0)) if match else None))
    return out


def iou(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """Intersection over union; 0 when either box is missing (an unparseable answer scores 0)."""
    if a is None or b is None:
        return 0.0
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def enclosing_box(boxes: Iterable[Sequence[float]]) -> Box:
    boxes = list(boxes)
    return (min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes))


def merge_overlapping(boxes: Sequence[Sequence[float]], threshold: float = 0.5) -> list[Box]:
    """VinDr-CXR rule: boxes (of one finding in one image) overlapping by more than `threshold`
    IoU are merged into their smallest enclosing box, repeatedly until no such pair is left."""
    out = [tuple(float(v) for v in b) for b in boxes]
    merged = True
    while merged:
        merged = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                if iou(out[i], out[j]) > threshold:
                    out[i] = enclosing_box([out[i], out[j]])
                    del out[j]
                    merged = True
                    break
            if merged:
                break
    return out  # type: ignore[return-value]


def circle_to_box(cx: float, cy: float, diameter: float) -> Box:
    """JSRT rule: a nodule circle (centre and diameter, pixels) -> its smallest enclosing box."""
    r = diameter / 2
    return (cx - r, cy - r, cx + r, cy + r)


def mask_to_boxes(mask: np.ndarray, min_pixels: int = 1) -> list[Box]:
    """Mask rule: one box per connected region (8-connectivity) of a binary mask, in pixels
    (x2, y2 exclusive), ordered left to right. Regions under `min_pixels` are ignored."""
    labelled, count = ndimage.label(np.asarray(mask) > 0, structure=np.ones((3, 3), dtype=int))
    boxes = []
    for index, region in enumerate(ndimage.find_objects(labelled), start=1):
        if region is None or (labelled[region] == index).sum() < min_pixels:
            continue
        ys, xs = region
        boxes.append((float(xs.start), float(ys.start), float(xs.stop), float(ys.stop)))
    return sorted(boxes)
