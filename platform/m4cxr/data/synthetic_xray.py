"""Procedurally drawn radiograph-like chest images with findings at known places.

Coordinates are fractions of the image side (0..1); x grows to the image's right, which is the
patient's LEFT (radiological convention). Each draw returns the uint8 image plus the boxes of
what it drew (findings, organs, the 29 Chest ImaGenome regions) in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# The 29 Chest ImaGenome anatomical regions (RGRG order).
IMAGENOME_REGIONS = (
    "right lung", "right upper lung zone", "right mid lung zone", "right lower lung zone",
    "right hilar structures", "right apical zone", "right costophrenic angle", "right hemidiaphragm",
    "left lung", "left upper lung zone", "left mid lung zone", "left lower lung zone",
    "left hilar structures", "left apical zone", "left costophrenic angle", "left hemidiaphragm",
    "trachea", "spine", "right clavicle", "left clavicle", "aortic arch", "mediastinum",
    "upper mediastinum", "svc", "cardiac silhouette", "cavoatrial junction", "right atrium",
    "carina", "abdomen",
)
ORGANS = ("right lung", "left lung", "heart")

# Finding kinds the world can draw, with the zones they may sit in.
LOCALISED = ("effusion", "pneumothorax", "consolidation", "opacity", "nodule", "mass",
             "atelectasis", "edema", "devices", "fracture", "cardiomegaly")


@dataclass
class Finding:
    kind: str
    side: str = ""  # "right" | "left" | "both" | "" (patient's side)
    zone: str = ""  # "upper" | "mid" | "lower" | ""
    severity: float = 0.5  # 0.2 (mild) .. 1 (severe)
    hedged: bool = False  # the report only suggests it ("may represent ...")
    offset: tuple[float, float] = (0.0, 0.0)  # position jitter within the zone, stable over time
    change: str = ""  # follow-up only: new | increased | decreased | unchanged | resolved


@dataclass
class Anatomy:
    cx: float
    lung_top: float
    lung_bottom: float
    lung_rx: float
    lung_gap: float  # distance of each lung centre from the midline
    heart_cy: float
    heart_ry: float
    heart_rx_normal: float
    contrast: float
    gamma: float
    noise_seed: int = 0


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    return Anatomy(
        cx=0.5 + rng.normal(0, 0.012),
        lung_top=0.13 + rng.normal(0, 0.01),
        lung_bottom=0.73 + rng.normal(0, 0.015),
        lung_rx=0.145 + rng.normal(0, 0.008),
        lung_gap=0.17 + rng.normal(0, 0.008),
        heart_cy=0.60 + rng.normal(0, 0.01),
        heart_ry=0.105 + rng.normal(0, 0.006),
        heart_rx_normal=0.125 + rng.normal(0, 0.006),
        contrast=1.0 + rng.normal(0, 0.06),
        gamma=1.0 + rng.normal(0, 0.08),
        noise_seed=int(rng.integers(1 << 30)),
    )


# ----------------------------------------------------------------------------- geometry helpers


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size) + 0.5) / size
    return np.meshgrid(coords, coords)  # X, Y


def _ellipse(X, Y, cx, cy, rx, ry, power: float = 2.0) -> np.ndarray:
    return (np.abs((X - cx) / rx) ** power + np.abs((Y - cy) / ry) ** power) <= 1.0


def _segment(X, Y, p0, p1, width) -> np.ndarray:
    """Pixels within width/2 of the segment p0-p1."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((X - x0) * dx + (Y - y0) * dy) / (dx * dx + dy * dy + 1e-12), 0, 1)
    return np.hypot(X - (x0 + t * dx), Y - (y0 + t * dy)) <= width / 2


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def _frac_box(size: int, x1, y1, x2, y2) -> tuple[float, float, float, float]:
    clip = lambda v: float(min(size, max(0.0, v * size)))  # noqa: E731
    return (clip(x1), clip(y1), clip(x2), clip(y2))


def _smooth_noise(rng, size: int, sigma: float) -> np.ndarray:
    field_ = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma * size)
    return field_ / (field_.std() + 1e-8)


def lung_centre(anat: Anatomy, side: str) -> float:
    # patient's right lung is on the image's left
    return anat.cx - anat.lung_gap if side == "right" else anat.cx + anat.lung_gap


def zone_centre(anat: Anatomy, side: str, zone: str, offset=(0.0, 0.0)) -> tuple[float, float]:
    top, bottom = anat.lung_top, anat.lung_bottom
    frac = {"upper": 0.22, "mid": 0.5, "lower": 0.75}.get(zone, 0.5)
    lx = lung_centre(anat, side)
    return lx + offset[0] * anat.lung_rx * 0.5, top + frac * (bottom - top) + offset[1] * 0.03


def heart_rx(anat: Anatomy, findings: list[Finding]) -> float:
    for f in findings:
        if f.kind == "cardiomegaly":
            return anat.heart_rx_normal * (1.25 + 0.45 * f.severity)
    return anat.heart_rx_normal


# ----------------------------------------------------------------------------- frontal view


@dataclass
class Drawing:
    pixels: np.ndarray  # uint8 (size, size)
    finding_boxes: list[tuple[int, tuple[float, float, float, float]]]  # (index into findings, box)
    organ_boxes: dict[str, tuple[float, float, float, float]]
    region_boxes: dict[str, tuple[float, float, float, float]]


def draw_frontal(anat: Anatomy, findings: list[Finding], size: int, rng: np.random.Generator,
                 view: str = "PA") -> Drawing:
    X, Y = _grid(size)
    cx = anat.cx
    img = np.full((size, size), 0.03)
    body = _ellipse(X, Y, cx, 0.58, 0.45, 0.6, power=2.6) & (Y > 0.04)
    img[body] = 0.42
    lungs = _draw_lungs(img, X, Y, anat, size)
    lung_any = lungs["right"] | lungs["left"]
    rib_masks = _draw_ribs(img, X, Y, anat, body)

    # Mediastinum, spine, trachea, heart.
    mediastinum = (np.abs(X - cx) < 0.055) & (Y > 0.06) & (Y < anat.heart_cy)
    img[mediastinum] = 0.56
    img[(np.abs(X - cx) < 0.03) & body] += 0.04  # spine shadow
    trachea = (np.abs(X - cx) < 0.013) & (Y > 0.05) & (Y < 0.3)
    img[trachea] = 0.3
    hrx = heart_rx(anat, findings)
    heart_cx = cx + 0.03 + (hrx - anat.heart_rx_normal) * 0.3
    heart = _ellipse(X, Y, heart_cx, anat.heart_cy, hrx, anat.heart_ry)
    img[heart] = 0.6
    aortic_knob = _ellipse(X, Y, cx + 0.05, 0.27, 0.035, 0.03)
    img[aortic_knob] = 0.58

    # Diaphragm and abdomen below the lungs.
    abdomen = body & (Y > anat.lung_bottom - 0.02) & ~lung_any
    img[abdomen] = np.maximum(img[abdomen], 0.5)

    # Clavicles.
    clavicles = {}
    for side, sign in (("right", -1), ("left", 1)):
        m = _segment(X, Y, (cx + sign * 0.06, 0.16), (cx + sign * 0.3, 0.115), 0.022)
        clavicles[side] = m
        img[m] += 0.18

    boxes: list[tuple[int, tuple[float, float, float, float]]] = []
    for index, f in enumerate(findings):
        box = _draw_finding(img, X, Y, anat, f, lungs, rib_masks, size, rng, body)
        if box is not None and f.kind in LOCALISED:
            boxes.append((index, box))
    pixels = _acquire(img, anat, view, rng)
    organ_boxes = {
        "right lung": _bbox(lungs["right"]),
        "left lung": _bbox(lungs["left"]),
        "heart": _bbox(heart),
    }
    regions = _regions(anat, lungs, heart, clavicles, size, heart_cx, hrx)
    return Drawing(pixels, boxes, organ_boxes, regions)


def _draw_lungs(img, X, Y, anat: Anatomy, size: int) -> dict[str, np.ndarray]:
    """Lungs: squarish ellipses (sharp costophrenic angles), markings from smooth noise."""
    lungs = {}
    lung_cy = (anat.lung_top + anat.lung_bottom) / 2
    lung_ry = (anat.lung_bottom - anat.lung_top) / 2
    for side in ("right", "left"):
        ry = lung_ry * (1.0 if side == "right" else 1.03)
        cy = lung_cy + (0.0 if side == "right" else lung_ry * 0.03)
        lungs[side] = _ellipse(X, Y, lung_centre(anat, side), cy, anat.lung_rx, ry, power=2.4)
    lung_any = lungs["right"] | lungs["left"]
    noise = np.random.default_rng(anat.noise_seed)
    markings = 0.025 * _smooth_noise(noise, size, 0.01) + 0.02 * _smooth_noise(noise, size, 0.004)
    hilum_glow = sum(
        0.1 * np.exp(-(((X - (anat.cx + (-1 if s == "right" else 1) * 0.09)) / 0.06) ** 2 + ((Y - 0.42) / 0.09) ** 2))
        for s in ("right", "left")
    )
    img[lung_any] = (0.13 + markings + hilum_glow)[lung_any]
    return lungs


def _draw_ribs(img, X, Y, anat: Anatomy, body) -> dict[str, list[np.ndarray]]:
    """Ribs: arcs over the lungs; each side's masks from top to bottom."""
    ribs = np.zeros_like(img)
    rib_masks: dict[str, list[np.ndarray]] = {"right": [], "left": []}
    for side in ("right", "left"):
        lx = lung_centre(anat, side)
        for i in range(9):
            y0 = anat.lung_top + 0.02 + i * 0.066
            curve = y0 + 0.05 * ((X - lx) / anat.lung_rx) ** 2
            band = (np.abs(Y - curve) < 0.009) & (np.abs(X - lx) < anat.lung_rx * 1.15) & body
            rib_masks[side].append(band)
            ribs[band] = 0.07
    img += ribs
    return rib_masks


def _acquire(img, anat: Anatomy, view: str, rng: np.random.Generator) -> np.ndarray:
    """Acquisition: AP films are a little brighter and blurrier; noise, blur, contrast, gamma."""
    if view == "AP":
        img = img * 0.95 + 0.05
    img = ndimage.gaussian_filter(img, 0.6 + (0.4 if view == "AP" else 0.0))
    img = img + rng.normal(0, 0.015, img.shape)
    img = np.clip((img - 0.5) * anat.contrast + 0.5, 0, 1) ** anat.gamma
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _draw_finding(img, X, Y, anat, f: Finding, lungs, rib_masks, size, rng, body):
    s = f.severity
    if f.kind == "cardiomegaly":  # drawn with the heart; its box is the enlarged heart
        hrx = heart_rx(anat, [f])
        hcx = anat.cx + 0.03 + (hrx - anat.heart_rx_normal) * 0.3
        return _frac_box(size, hcx - hrx, anat.heart_cy - anat.heart_ry, hcx + hrx, anat.heart_cy + anat.heart_ry)
    sides = ("right", "left") if f.side == "both" else (f.side or "right",)
    masks = []
    for side in sides:
        lung = lungs[side]
        lx = lung_centre(anat, side)
        lateral = -1 if side == "right" else 1  # direction of the lateral chest wall in x
        if f.kind == "effusion":
            level = anat.lung_bottom - (0.07 + 0.2 * s)
            meniscus = level - 0.06 * np.clip(lateral * (X - lx) / anat.lung_rx + 0.5, 0, 1.5)
            m = lung & (Y > meniscus)
            img[m] = 0.48 + 0.03 * (Y[m] - level)
        elif f.kind == "pneumothorax":
            shrink = 0.2 + 0.25 * s
            collapsed = _ellipse(X, Y, lx - lateral * anat.lung_rx * shrink * 0.5,
                                 (anat.lung_top + anat.lung_bottom) / 2 + 0.03 * s,
                                 anat.lung_rx * (1 - shrink * 0.5),
                                 (anat.lung_bottom - anat.lung_top) / 2 * (1 - shrink * 0.35), power=2.4)
            m = lung & ~collapsed
            img[m] = 0.06
            edge = collapsed & ~ndimage.binary_erosion(collapsed, iterations=max(1, size // 200)) & lung
            img[edge] = 0.4
        elif f.kind in ("consolidation", "opacity", "nodule", "mass"):
            zx, zy = zone_centre(anat, side, f.zone, f.offset)
            if f.kind == "consolidation":
                r = 0.045 + 0.04 * s
                prof = np.exp(-(((X - zx) ** 2 + (Y - zy) ** 2) / (r * r)) ** 2)
                tex = 0.75 + 0.25 * _smooth_noise(rng, size, 0.01)
                add = 0.38 * prof * tex
                m = lung & (prof > 0.25)
            elif f.kind == "opacity":
                r = 0.06 + 0.05 * s
                prof = np.exp(-((X - zx) ** 2 + (Y - zy) ** 2) / (r * r))
                add = 0.2 * prof
                m = lung & (prof > 0.35)
            else:
                r = (0.013 + 0.012 * s) if f.kind == "nodule" else (0.035 + 0.03 * s)
                prof = np.clip((r - np.hypot(X - zx, Y - zy)) / (0.25 * r) + 0.5, 0, 1)
                add = 0.34 * prof
                m = prof > 0.5
            img[lung] += add[lung]
            m = m & lung
        elif f.kind == "atelectasis":
            zx, zy = zone_centre(anat, side, f.zone or "lower", f.offset)
            w = 0.01 + 0.012 * s
            m = _segment(X, Y, (zx - 0.08, zy + 0.015), (zx + 0.08, zy - 0.015), w) & lung
            img[m] += 0.3
        elif f.kind == "edema":
            hx = anat.cx + (-1 if side == "right" else 1) * 0.1
            sigma = 0.08 + 0.05 * s
            prof = np.exp(-(((X - hx) / sigma) ** 2 + ((Y - 0.45) / (1.4 * sigma)) ** 2))
            img[lung] += (0.22 * (0.5 + s) * prof)[lung]
            m = lung & (prof > 0.3)
        elif f.kind == "fracture":
            ribs = rib_masks[side]
            rib = ribs[{"upper": 2, "mid": 4, "lower": 6}.get(f.zone, 4)]
            fx = lx + lateral * anat.lung_rx * 0.6
            gap = rib & (np.abs(X - fx) < 0.008 + 0.006 * s)
            img[gap] -= 0.07
            shifted = np.roll(rib & (lateral * (X - fx) > 0), max(1, int(0.012 * size * (0.5 + s))), axis=0)
            img[shifted & body] += 0.08
            m = (np.abs(X - fx) < 0.035) & (np.abs(Y - np.median(np.nonzero(rib)[0]) / size) < 0.03)
        elif f.kind == "devices":
            cx = anat.cx
            tube = _segment(X, Y, (cx, 0.0), (cx, 0.22 + 0.03 * s), 0.008)
            line = _segment(X, Y, (cx - 0.26, 0.12), (cx - 0.07, 0.17), 0.006) | _segment(
                X, Y, (cx - 0.07, 0.17), (cx - 0.035, 0.33), 0.006)
            m = tube | (line if s > 0.5 else np.zeros_like(tube))
            img[m] = 0.97
        else:
            raise ValueError(f"cannot draw finding kind {f.kind!r}")
        masks.append(m)
    union = np.logical_or.reduce(masks)
    return _bbox(union)


def _regions(anat, lungs, heart, clavicles, size, heart_cx, hrx) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for side in ("right", "left"):
        box = _bbox(lungs[side])
        x1, y1, x2, y2 = (v / size for v in box)
        h = y2 - y1
        lateral_is_left = side == "right"
        lat_x1, lat_x2 = (x1, x1 + (x2 - x1) * 0.35) if lateral_is_left else (x2 - (x2 - x1) * 0.35, x2)
        med_x1, med_x2 = (x2 - (x2 - x1) * 0.4, x2) if lateral_is_left else (x1, x1 + (x2 - x1) * 0.4)
        out[f"{side} lung"] = box
        out[f"{side} upper lung zone"] = _frac_box(size, x1, y1, x2, y1 + h / 3)
        out[f"{side} mid lung zone"] = _frac_box(size, x1, y1 + h / 3, x2, y1 + 2 * h / 3)
        out[f"{side} lower lung zone"] = _frac_box(size, x1, y1 + 2 * h / 3, x2, y2)
        out[f"{side} hilar structures"] = _frac_box(size, med_x1, y1 + 0.33 * h, med_x2, y1 + 0.6 * h)
        out[f"{side} apical zone"] = _frac_box(size, x1 + 0.1 * (x2 - x1), y1, x2 - 0.1 * (x2 - x1), y1 + 0.15 * h)
        out[f"{side} costophrenic angle"] = _frac_box(size, lat_x1, y2 - 0.12 * h, lat_x2, y2 + 0.02)
        out[f"{side} hemidiaphragm"] = _frac_box(size, x1, y2 - 0.06, x2, y2 + 0.03)
        out[f"{side} clavicle"] = _bbox(clavicles[side])
    cx = anat.cx
    hy1, hy2 = anat.heart_cy - anat.heart_ry, anat.heart_cy + anat.heart_ry
    out["trachea"] = _frac_box(size, cx - 0.02, 0.05, cx + 0.02, 0.3)
    out["spine"] = _frac_box(size, cx - 0.035, 0.05, cx + 0.035, 0.98)
    out["aortic arch"] = _frac_box(size, cx + 0.015, 0.24, cx + 0.085, 0.3)
    out["mediastinum"] = _frac_box(size, cx - 0.07, 0.12, cx + 0.09, hy2)
    out["upper mediastinum"] = _frac_box(size, cx - 0.06, 0.12, cx + 0.07, 0.33)
    out["svc"] = _frac_box(size, cx - 0.06, 0.16, cx - 0.02, 0.35)
    out["cardiac silhouette"] = _bbox(heart)
    out["cavoatrial junction"] = _frac_box(size, heart_cx - hrx - 0.01, hy1 - 0.02, heart_cx - hrx + 0.05, hy1 + 0.04)
    out["right atrium"] = _frac_box(size, heart_cx - hrx, hy1 + 0.02, heart_cx - 0.02, hy2 - 0.01)
    out["carina"] = _frac_box(size, cx - 0.03, 0.28, cx + 0.03, 0.34)
    out["abdomen"] = _frac_box(size, cx - 0.35, anat.lung_bottom + 0.02, cx + 0.35, 1.0)
    assert set(out) == set(IMAGENOME_REGIONS), set(IMAGENOME_REGIONS) ^ set(out)
    return {name: out[name] for name in IMAGENOME_REGIONS}


# ----------------------------------------------------------------------------- lateral view


def draw_lateral(anat: Anatomy, findings: list[Finding], size: int, rng: np.random.Generator) -> np.ndarray:
    """A lateral view: one lung field, heart anterior (image left), spine posterior (image right)."""
    X, Y = _grid(size)
    img = np.full((size, size), 0.03)
    body = _ellipse(X, Y, 0.5, 0.56, 0.38, 0.58, power=2.4) & (Y > 0.05)
    img[body] = 0.44
    lung = _ellipse(X, Y, 0.53, 0.45, 0.24, 0.3, power=2.3)
    noise = np.random.default_rng(anat.noise_seed + 1)
    img[lung] = (0.17 + 0.025 * _smooth_noise(noise, size, 0.01))[lung]
    for k in range(10):  # vertebral bodies
        vb = (np.abs(X - 0.8) < 0.045) & (np.abs(Y - (0.12 + 0.075 * k)) < 0.03)
        img[vb & body] = 0.62
    hrx = heart_rx(anat, findings) / anat.heart_rx_normal * 0.12
    heart = _ellipse(X, Y, 0.38 + hrx * 0.2, 0.6, hrx, 0.14)
    img[heart] = np.maximum(img[heart], 0.5)
    img[(Y > 0.74) & body & ~lung] = 0.5
    for f in findings:
        s = f.severity
        if f.kind == "effusion":
            m = lung & (Y > 0.72 - 0.12 * s) & (X > 0.55)
            img[m] = 0.47
        elif f.kind in ("consolidation", "opacity", "mass", "nodule", "edema"):
            zy = {"upper": 0.3, "mid": 0.45, "lower": 0.6}.get(f.zone, 0.45)
            r = {"nodule": 0.02, "mass": 0.05, "edema": 0.12}.get(f.kind, 0.06) * (0.7 + 0.6 * s)
            prof = np.exp(-((X - 0.55 - f.offset[0] * 0.05) ** 2 + (Y - zy) ** 2) / (r * r))
            img[lung] += (0.25 * prof)[lung]
        elif f.kind == "pneumothorax":
            m = lung & (Y < 0.25 + 0.1 * s)
            img[m] = 0.08
        elif f.kind == "devices":
            img[_segment(X, Y, (0.45, 0.0), (0.5, 0.25), 0.008)] = 0.97
    img = ndimage.gaussian_filter(img, 0.7) + rng.normal(0, 0.015, img.shape)
    img = np.clip((img - 0.5) * anat.contrast + 0.5, 0, 1) ** anat.gamma
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)
