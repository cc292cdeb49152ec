"""The routes' requests as pydantic models, and the checks of what they carry: every problem
becomes a RequestError that the route answers as a 4xx with a JSON body {"error": "..."} naming
what is wrong and where.

A model refuses fields it does not know (extra="forbid") and takes no other type than its own
(strict: 1 is not true, "2" is not 2); request_error turns pydantic's ValidationError into the
route's message. Images arrive as base64 PNG, JPEG or DICOM (also as data URLs in chat messages)
and are decoded by the models' validators. DICOM goes through pydicom with its VOI LUT and
photometric interpretation; its patient tags are never read into logs or answers. Decoded images
over MAX_PIXELS are refused before they are decompressed (a decompression bomb).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Annotated, Any, ClassVar

import pydicom
from PIL import Image
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from m4cxr.boxes import BOX_PATTERN
from m4cxr.data.images import dicom_to_image
from m4cxr.tasks import max_images, report_scenarios, served_choices, takes_prior_study

MAX_PIXELS = 40_000_000  # a 6,000 x 6,000 radiograph fits; a decompression bomb does not
SCENARIOS = tuple(report_scenarios())
PRIOR_SCENARIO = next(s for s in SCENARIOS if takes_prior_study(s))  # the one given the previous study
GROUNDING_TARGETS = tuple(served_choices("grounding", "target"))  # what a box is asked for
GROUNDING_ASKS = tuple(served_choices("grounding", "ask"))  # what a box is asked about
VQA_MAX_IMAGES = max(served_choices("vqa", "images"))  # [main] or [reference, main]


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as JSON, whatever its Content-Type says (curl -d sends a form's)."""
    try:
        body = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"the body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


# ----------------------------------------------------------------------------- images


def dicom_image(data: bytes, where: str) -> Image.Image:
    """A DICOM file's pixels as an 8-bit grey image (see data/images.py); only pixel attributes
    are read."""
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


def decode_images(values: list, name: str, low: int, high: int) -> list[Image.Image]:
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


def non_empty(value: str, info: ValidationInfo) -> str:
    """A text field's value, stripped; an empty one is refused."""
    if not value.strip():
        raise RequestError(f"field '{info.field_name}' is empty")
    return value.strip()


# ----------------------------------------------------------------------------- requests


class Body(BaseModel):
    """A route's request: its own fields only, each of its own type."""
    model_config = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True)
    route: ClassVar[str]  # as the messages name it


TYPE_NAMES = {"string_type": "str", "list_type": "list", "dict_type": "dict", "int_type": "int",
              "float_type": "float"}


def request_error(err: ValidationError, request: type[Body]) -> RequestError:
    """pydantic's ValidationError -> the route's RequestError, with the message of its first
    problem (unknown fields first: nothing a client sends is silently ignored)."""
    problems = err.errors()
    unknown = sorted(str(p["loc"][0]) for p in problems if p["type"] == "extra_forbidden")
    if unknown:
        return RequestError(f"field(s) {unknown} are not supported by {request.route}; "
                            f"supported: {list(request.model_fields)}")
    first = problems[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, RequestError):  # a validator's own message (and status: 413 for a large image)
        return cause
    name = ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        return RequestError(f"missing field '{name}'")
    if first["type"] == "bool_type":
        return RequestError(f"field '{name}' must be true or false")
    if first["type"] in TYPE_NAMES:
        return RequestError(f"field '{name}' must be {TYPE_NAMES[first['type']]}, got {type(first['input']).__name__}")
    return RequestError(f"field '{name}': {first['msg']}")


def checked(request: type[Body], body: dict, context: dict | None = None):
    """The body as the route's request, or its RequestError (the web page's way in; the routes
    let FastAPI's exception handler translate)."""
    try:
        return request.model_validate(body, context=context)
    except ValidationError as err:
        raise request_error(err, request) from None


def one_of(choices: tuple[str, ...]) -> BeforeValidator:
    def check(value: Any, info: ValidationInfo) -> str:
        if value not in choices:
            raise RequestError(f"field '{info.field_name}' must be one of {list(choices)}, got {value!r}")
        return value
    return BeforeValidator(check)


class ReportRequest(Body):
    """POST /mrg: the study's images (and, for the prior-study scenario, the previous study's)."""
    route: ClassVar[str] = "/mrg"
    model: str | None = None
    scenario: Annotated[str, one_of(SCENARIOS)] = SCENARIOS[0]
    images: list[Any]
    prior_images: list[Any] | None = None
    prior_report: str | None = None
    cot: bool = True
    grounded: bool = False  # each sentence stating a present finding with its box on images[0]
    stream: bool = False

    @model_validator(mode="after")
    def decoded(self) -> ReportRequest:
        """The images decoded, within the scenario's count (a prior study's images count too)."""
        limit = max_images(self.scenario)
        if not takes_prior_study(self.scenario):
            for extra in ("prior_images", "prior_report"):
                if getattr(self, extra):
                    raise RequestError(f"field '{extra}' is only for scenario '{PRIOR_SCENARIO}'")
            self.images = decode_images(self.images, "images", 1, limit)
            return self
        if not self.prior_images or not self.prior_report:
            raise RequestError(f"scenario '{self.scenario}' needs the prior study: 'prior_images' and 'prior_report'")
        if not self.prior_report.strip():
            raise RequestError("field 'prior_report' is empty")
        self.prior_report = self.prior_report.strip()
        self.prior_images = decode_images(self.prior_images, "prior_images", 1, limit - 1)
        self.images = decode_images(self.images, "images", 1, limit - len(self.prior_images))
        return self


class GroundingRequest(Body):
    """POST /grounding: the box of a phrase, finding, organ or region (one of them), or what is
    in a given box (`ask` says what kind of answer)."""
    route: ClassVar[str] = "/grounding"
    model: str | None = None
    image: Any
    box: Any = None
    ask: str = GROUNDING_ASKS[0]
    phrase: str | None = None  # one field per GROUNDING_TARGETS
    finding: str | None = None
    organ: str | None = None
    region: str | None = None

    @field_validator("image", mode="before")
    @classmethod
    def decoded(cls, value: Any) -> Image.Image:
        return decode_image(value, "image")

    @field_validator("box", mode="before")
    @classmethod
    def checked_box(cls, value: Any) -> list[int]:
        return parse_box(value)

    @field_validator("ask", mode="before")
    @classmethod
    def checked_ask(cls, value: Any) -> str:
        if value not in GROUNDING_ASKS:
            names = ", ".join(GROUNDING_ASKS[:-1]) + f" or {GROUNDING_ASKS[-1]}"
            raise RequestError(f"field 'ask' must be {names}, got {value!r}")
        return value

    @model_validator(mode="after")
    def one_question(self) -> GroundingRequest:
        """Either a box, or exactly one target with its text."""
        targets = self.targets()
        if "box" in self.model_fields_set:
            if targets:
                raise RequestError(f"give either 'box' (what is in this region) or one of {list(GROUNDING_TARGETS)}, "
                                   "not both")
            return self
        if len(targets) != 1:
            raise RequestError(f"give exactly one of {list(GROUNDING_TARGETS)} (or 'box'), got {targets or 'none'}")
        text = getattr(self, targets[0])
        if text is None:
            raise RequestError(f"field '{targets[0]}' must be str, got NoneType")
        if not text.strip():
            raise RequestError(f"field '{targets[0]}' is empty")
        setattr(self, targets[0], text.strip())
        return self

    def targets(self) -> list[str]:
        return [t for t in GROUNDING_TARGETS if t in self.model_fields_set]

    @property
    def target(self) -> str | None:
        """What a box is asked for (phrase, finding, organ, region); None when a box is given."""
        return next(iter(self.targets()), None)

    @property
    def text(self) -> str:
        return getattr(self, self.target) if self.target else ""


class VQARequest(Body):
    """POST /vqa: a question about one image, or about two (a reference, then the main image)."""
    route: ClassVar[str] = "/vqa"
    model: str | None = None
    images: list[Any]
    question: str

    @field_validator("images")
    @classmethod
    def decoded(cls, value: list) -> list[Image.Image]:
        return decode_images(value, "images", 1, VQA_MAX_IMAGES)

    @field_validator("question")
    @classmethod
    def asked(cls, value: str, info: ValidationInfo) -> str:
        return non_empty(value, info)
