"""Request checking for the services: every problem becomes a RequestError that the service
turns into a 4xx with a JSON body {"error": "..."} naming what is wrong and where.

Images arrive as base64 PNG, JPEG or DICOM (also as data URLs in chat messages). DICOM goes
through pydicom with its VOI LUT and photometric interpretation; its patient tags are never read
into logs or answers. Decoded images over MAX_PIXELS are refused before they are decompressed
(a decompression bomb).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any

from PIL import Image

from m4cxr.boxes import BOX_PATTERN

MAX_PIXELS = 40_000_000  # a 6,000 x 6,000 radiograph fits; a decompression bomb does not
MAX_IMAGES = {"single_image": 1, "multi_image": 5, "multi_study": 10}  # the paper's limits
SCENARIOS = tuple(MAX_IMAGES)
GROUNDING_TARGETS = ("phrase", "finding", "organ", "region")


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"the body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


def field(body: dict, name: str, kind: type | tuple, where: str = "") -> Any:
    if name not in body:
        raise RequestError(f"missing field '{where}{name}'")
    value = body[name]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RequestError(f"field '{where}{name}' must be {names}, got {type(value).__name__}")
    return value


def text_field(body: dict, name: str) -> str:
    value = field(body, name, str).strip()
    if not value:
        raise RequestError(f"field '{name}' is empty")
    return value


# ----------------------------------------------------------------------------- images


def dicom_image(data: bytes, where: str) -> Image.Image:
    """A DICOM file's pixels as an 8-bit grey image (see data/images.py); only pixel attributes
    are read."""
    import pydicom

    from m4cxr.data.images import dicom_to_image

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        rows, cols = int(ds.Rows), int(ds.Columns)
        if rows * cols > MAX_PIXELS:
            raise RequestError(f"{where}: {cols}x{rows} pixels is over the limit of {MAX_PIXELS:,}", 413)
        return dicom_to_image(ds)
    except RequestError:
        raise
    except Exception as err:  # pydicom raises many kinds; the message says which
        raise RequestError(f"{where}: a DICOM file that cannot be read ({type(err).__name__})") from err


def decode_image(value: Any, where: str) -> Image.Image:
    """A base64 string (or data URL) -> a PIL image, checked."""
    if not isinstance(value, str) or not value:
        raise RequestError(f"{where} must be a base64 string of a PNG, JPEG or DICOM file")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if ";base64" not in header:
            raise RequestError(f"{where}: a data URL must be base64 encoded")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(f"{where}: not valid base64 ({err})") from err
    if len(data) > 132 and data[128:132] == b"DICM":
        return dicom_image(data, where)
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
            kind = probe.format
    except Image.DecompressionBombError as err:
        raise RequestError(f"{where}: the image is over the limit of {MAX_PIXELS:,} pixels "
                           f"(a decompression bomb?)", 413) from err
    except Exception as err:
        raise RequestError(f"{where}: not an image (PNG, JPEG or DICOM expected)") from err
    if width * height > MAX_PIXELS:
        raise RequestError(f"{where}: {width}x{height} pixels is over the limit of {MAX_PIXELS:,}", 413)
    if kind not in ("PNG", "JPEG"):
        raise RequestError(f"{where}: {kind} images are not accepted (PNG, JPEG or DICOM)")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:
        raise RequestError(f"{where}: corrupt {kind} data ({type(err).__name__}: {err})") from err
    return image.convert("L")


def decode_images(body: dict, name: str, low: int, high: int) -> list[Image.Image]:
    values = field(body, name, list)
    if not low <= len(values) <= high:
        raise RequestError(f"field '{name}' must hold {low} to {high} images, got {len(values)}")
    return [decode_image(v, f"{name}[{i}]") for i, v in enumerate(values)]


def parse_box(value: Any, where: str = "box") -> list[int]:
    """[x1, y1, x2, y2] in 0..100 with x1 < x2 and y1 < y2 (a list or the "[..]" text)."""
    if isinstance(value, str):
        match = BOX_PATTERN.fullmatch(value.strip())
        if not match:
            raise RequestError(f"{where}: {value!r} is not a box '[x1,y1,x2,y2]'")
        value = [float(v) for v in match.groups()]
    if not isinstance(value, list) or len(value) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise RequestError(f"{where} must be four numbers [x1, y1, x2, y2]")
    if not all(0 <= v <= 100 for v in value):
        raise RequestError(f"{where}: coordinates must lie in 0-100 (relative to the image), got {value}")
    x1, y1, x2, y2 = value
    if not (x1 < x2 and y1 < y2):
        raise RequestError(f"{where}: needs x1 < x2 and y1 < y2, got {value}")
    return [int(round(v)) for v in value]


# ----------------------------------------------------------------------------- routes


def parse_mrg(body: dict) -> dict[str, Any]:
    scenario = body.get("scenario", "single_image")
    if scenario not in SCENARIOS:
        raise RequestError(f"field 'scenario' must be one of {list(SCENARIOS)}, got {scenario!r}")
    cot = body.get("cot", True)
    if not isinstance(cot, bool):
        raise RequestError("field 'cot' must be true or false")
    limit = MAX_IMAGES[scenario]
    if scenario != "multi_study":
        for extra in ("prior_images", "prior_report"):
            if body.get(extra):
                raise RequestError(f"field '{extra}' is only for scenario 'multi_study'")
        return {"scenario": scenario, "cot": cot, "images": decode_images(body, "images", 1, limit)}
    if not body.get("prior_images") or not body.get("prior_report"):
        raise RequestError("scenario 'multi_study' needs the prior study: 'prior_images' and 'prior_report'")
    prior_report = text_field(body, "prior_report")
    prior = decode_images(body, "prior_images", 1, limit - 1)
    current = decode_images(body, "images", 1, limit - len(prior))
    return {"scenario": scenario, "cot": cot, "images": current, "prior_images": prior, "prior_report": prior_report}


def parse_grounding(body: dict) -> dict[str, Any]:
    image = decode_image(body.get("image"), "image") if "image" in body else None
    if image is None:
        raise RequestError("missing field 'image'")
    targets = [k for k in GROUNDING_TARGETS if k in body]
    if "box" in body:
        if targets:
            raise RequestError(f"give either 'box' (what is in this region) or one of {list(GROUNDING_TARGETS)}, not both")
        kind = body.get("ask", "finding")
        if kind not in ("finding", "organ", "region", "phrase"):
            raise RequestError(f"field 'ask' must be finding, organ, region or phrase, got {kind!r}")
        return {"image": image, "box": parse_box(body["box"]), "ask": kind}
    if len(targets) != 1:
        raise RequestError(f"give exactly one of {list(GROUNDING_TARGETS)} (or 'box'), got {targets or 'none'}")
    return {"image": image, "target": targets[0], "text": text_field(body, targets[0])}


def parse_vqa(body: dict) -> dict[str, Any]:
    images = decode_images(body, "images", 1, 2)
    return {"images": images, "question": text_field(body, "question")}
