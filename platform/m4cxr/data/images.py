"""Reading radiographs from the files the public datasets ship: PNG, JPEG, DICOM and JSRT's
headerless raw .IMG, always to an 8-bit grey PIL image.

DICOM goes through pydicom with its modality and VOI LUT; MONOCHROME1 is inverted so that
bone is bright everywhere. Only pixel attributes are read: patient tags never leave here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from PIL import Image

DICOM_SUFFIXES = (".dcm", ".dicom")
JSRT_SIDE = 2048  # JSRT .IMG: 2048 x 2048, 16-bit big-endian words holding 12-bit values


def is_dicom(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def grey8(pixels: np.ndarray, invert: bool = False) -> Image.Image:
    """Any-range pixels, min-max scaled to an 8-bit grey image (inverted on request)."""
    pixels = pixels.astype(np.float64)
    lo, hi = float(pixels.min()), float(pixels.max())
    pixels = (pixels - lo) / (hi - lo) if hi > lo else np.zeros_like(pixels)
    return Image.fromarray(((1.0 - pixels if invert else pixels) * 255).round().astype(np.uint8), mode="L")


def dicom_to_image(ds) -> Image.Image:
    """A pydicom dataset's pixels as an 8-bit grey image (modality + VOI LUT, MONOCHROME1 inverted)."""
    pixels = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    if pixels.ndim == 3:  # several frames or colour: the first frame, grey
        pixels = pixels[0] if pixels.shape[-1] not in (3, 4) else pixels[..., :3].mean(-1)
    return grey8(pixels, invert=str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1")


def read_jsrt(path: str | Path) -> Image.Image:
    raw = np.fromfile(path, dtype=">u2")
    if raw.size != JSRT_SIDE * JSRT_SIDE:
        raise ValueError(f"{path}: {raw.size * 2} bytes, a JSRT .IMG has {JSRT_SIDE * JSRT_SIDE * 2}")
    pixels = np.clip(raw.reshape(JSRT_SIDE, JSRT_SIDE), 0, 4095)
    return grey8(pixels, invert=True)  # in JSRT's files larger values are darker


def read_image(path: str | Path) -> Image.Image:
    """Any supported radiograph file -> an 8-bit grey image; raises ValueError naming the file."""
    path = Path(path)
    try:
        if path.suffix.upper() == ".IMG":
            return read_jsrt(path)
        if is_dicom(path):

            return dicom_to_image(pydicom.dcmread(path))
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I"):  # 16-bit PNG: scale to 8 bits
                return grey8(np.asarray(image))
            return image.convert("L")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such image file") from None
    except Exception as err:
        raise ValueError(f"{path}: unreadable image ({type(err).__name__}: {err})") from err


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    path = Path(path)
    try:
        if path.suffix.upper() == ".IMG":
            return JSRT_SIDE, JSRT_SIDE
        if is_dicom(path):

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Columns), int(ds.Rows)
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise ValueError(f"{path}: no such image file") from None
    except Exception as err:
        raise ValueError(f"{path}: unreadable image ({type(err).__name__}: {err})") from err


def read_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A binary mask file as a bool array, resized (nearest) to `size` = (width, height) if given."""
    try:
        with Image.open(path) as mask:
            mask = mask.convert("L")
            if size is not None and mask.size != tuple(size):
                mask = mask.resize(tuple(size), Image.NEAREST)
            return np.asarray(mask) > 127
    except FileNotFoundError:
        raise ValueError(f"{path}: no such mask file") from None
    except Exception as err:
        raise ValueError(f"{path}: unreadable mask ({type(err).__name__}: {err})") from err


def resize_shortest_edge(image: Image.Image, size: int) -> tuple[Image.Image, float]:
    """Resize so that the shorter side is `size` pixels; returns the image and the scale."""
    scale = size / min(image.size)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(new, Image.BICUBIC), scale


def difference_hash(image: Image.Image, side: int = 16) -> str:
    """A 256-bit difference hash (grey thumbnail, left-right gradient signs): the same radiograph
    saved at another size or format hashes the same, which finds one dataset's copies in another."""
    small = np.asarray(image.convert("L").resize((side + 1, side), Image.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):0{side * side // 4}x}"
