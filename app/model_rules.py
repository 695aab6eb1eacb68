"""Each model's published request rules, as data, and the pure checks that apply them.

The provider bills what it accepts and refuses the rest only after the call,
so a request is checked here first and every broken rule is reported at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

DEFAULT_MODEL = "gpt-image-1.5"
MAX_IMAGE_URLS = 16
MAX_URL_LENGTH = 2048
# The provider counts 2000 tokens; a token is at least one character and
# rarely more than three UTF-8 bytes, so 6000 bytes stays safely inside it.
TOKEN_SAFE_PROMPT_BYTES = 6000

QUALITIES = ("low", "medium", "high")
GPT_IMAGE_2_RATIOS = (
    *("1:1", "1:2", "2:1", "1:3", "3:1", "2:3", "3:2", "3:4", "4:3"),
    *("4:5", "5:4", "9:16", "16:9", "9:21", "21:9"),
)
# The provider's pages for the beta disagree, and what it accepts has changed
# over time: the narrower set is accepted (the ratios on StarMagic's own page,
# resolution 1K only, no explicit WxH).
BETA_RATIOS = ("1:1", "3:2", "2:3", "4:3", "3:4", "5:4", "4:5", "16:9", "9:16", "21:9", "9:21")

# WxH: plain digits without leading zeros (at most nine, so int() stays cheap)
# and an x or the multiplication sign between.
_DIMENSIONS = re.compile(r"([1-9][0-9]{0,8})[x\u00d7]([1-9][0-9]{0,8})")


@dataclass(frozen=True, slots=True)
class PixelBounds:
    """The limits of an explicit `WxH` size."""

    multiple: int = 16
    min_side: int = 16
    max_side: int = 3840
    min_pixels: int = 655_360
    max_pixels: int = 8_294_400
    max_aspect: int = 3  # long side : short side


@dataclass(frozen=True, slots=True)
class ModelRules:
    """What one model accepts; an empty tuple means the field is not offered."""

    name: str
    sizes: tuple[str, ...]
    pixel_bounds: PixelBounds | None  # explicit WxH within these bounds, or None
    resolutions: tuple[str, ...]
    qualities: tuple[str, ...]
    max_n: int
    sends_n: bool  # whether the provider's body has an `n` field at all
    takes_mask: bool
    max_prompt_bytes: int | None
    max_prompt_chars: int | None
    default_size: str | None
    default_resolution: str | None
    default_quality: str | None

    def defaults(self) -> dict[str, str | int]:
        """What the provider uses for each field left out."""
        values: dict[str, str | int] = {"n": 1}
        for name in ("size", "resolution", "quality"):
            if (value := getattr(self, f"default_{name}")) is not None:
                values[name] = value
        return values


RULES: dict[str, ModelRules] = {
    rules.name: rules
    for rules in (
        ModelRules(
            name="gpt-image-1.5",
            sizes=("1:1", "2:3", "3:2", "1024x1024", "1024x1536", "1536x1024"),
            pixel_bounds=None,
            resolutions=(),
            qualities=QUALITIES,
            max_n=1,
            sends_n=True,
            takes_mask=False,
            max_prompt_bytes=TOKEN_SAFE_PROMPT_BYTES,
            max_prompt_chars=None,
            default_size=None,
            default_resolution=None,
            default_quality="high",
        ),
        ModelRules(
            name="gpt-image-2",
            sizes=("auto", *GPT_IMAGE_2_RATIOS),
            pixel_bounds=PixelBounds(),
            resolutions=("1K", "2K", "4K"),
            qualities=QUALITIES,
            max_n=10,
            sends_n=True,
            takes_mask=True,
            max_prompt_bytes=None,
            max_prompt_chars=32_000,
            default_size="auto",
            default_resolution="1K",
            default_quality="medium",
        ),
        ModelRules(
            name="gpt-image-2-beta",
            sizes=("auto", *BETA_RATIOS),
            pixel_bounds=None,
            resolutions=("1K",),
            qualities=(),
            max_n=1,
            sends_n=False,
            takes_mask=False,
            max_prompt_bytes=TOKEN_SAFE_PROMPT_BYTES,
            max_prompt_chars=2000,
            default_size="auto",
            default_resolution="1K",
            default_quality=None,
        ),
    )
}
KNOWN_MODELS = tuple(RULES)


@dataclass(frozen=True, slots=True)
class FieldError:
    """One broken rule: the request field (dotted path) and why."""

    field: str
    reason: str


@dataclass(frozen=True, slots=True)
class RequestFields:
    """The request fields the rules look at; None means not given."""

    prompt: str | None = None
    size: str | None = None
    resolution: str | None = None
    quality: str | None = None
    n: int | None = None
    image_urls: list[str] | None = None
    mask_url: str | None = None


def normalise_resolution(value: str) -> str:
    """The provider reads resolutions case-insensitively; `1K` is the spelling we keep."""
    return value.upper()


def url_problem(url: str) -> str | None:
    """Why a URL cannot be handed to the provider, or None."""
    if not url.isprintable():  # control characters, NUL and lone surrogates
        return "must not contain control characters or invalid Unicode"
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return f"must be an https:// URL: {url[:100]!r}"
    if len(url) > MAX_URL_LENGTH:
        return f"must be at most {MAX_URL_LENGTH} characters"
    return None


def _listed(values: tuple[str, ...]) -> str:
    return ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]


def pixel_size_problems(width: int, height: int, bounds: PixelBounds) -> list[str]:
    """Every limit an explicit `WxH` breaks, each in its own words."""
    problems = []
    for side, value in (("width", width), ("height", height)):
        if not bounds.min_side <= value <= bounds.max_side:
            problems.append(f"{side} {value} is outside {bounds.min_side} to {bounds.max_side}")
        if value % bounds.multiple:
            problems.append(f"{side} {value} is not a multiple of {bounds.multiple}")
    pixels = width * height
    if pixels < bounds.min_pixels:
        problems.append(f"{width}x{height} is {pixels:,} pixels, fewer than {bounds.min_pixels:,}")
    if pixels > bounds.max_pixels:
        problems.append(f"{width}x{height} is {pixels:,} pixels, more than {bounds.max_pixels:,}")
    if max(width, height) > bounds.max_aspect * min(width, height):
        problems.append(f"{width}x{height} has a long:short side ratio over {bounds.max_aspect}:1")
    return problems


def _size_problems(size: str, rules: ModelRules) -> list[str]:
    if size in rules.sizes:
        return []
    match = _DIMENSIONS.fullmatch(size)
    if match and rules.pixel_bounds is not None:
        return pixel_size_problems(int(match[1]), int(match[2]), rules.pixel_bounds)
    if match and "auto" in rules.sizes:
        return [f"{rules.name} takes no explicit WxH size; use {_listed(rules.sizes)}"]
    shapes = _listed(rules.sizes)
    if rules.pixel_bounds is not None:
        ratios = ", ".join(size for size in rules.sizes if size != "auto")
        shapes = f"auto, a ratio ({ratios}) or WxH (x or \u00d7 between)"
    return [f"must be {shapes} for {rules.name}"]


def _prompt_problems(prompt: str, rules: ModelRules) -> list[str]:
    problems = []
    if rules.max_prompt_chars is not None and len(prompt) > rules.max_prompt_chars:
        problems.append(f"is too long: at most {rules.max_prompt_chars} characters")
    if rules.max_prompt_bytes is not None and len(prompt.encode()) > rules.max_prompt_bytes:
        problems.append(f"is too long: at most {rules.max_prompt_bytes} UTF-8 bytes")
    return problems


def _option_problems(fields: RequestFields, rules: ModelRules) -> list[FieldError]:
    errors = []
    if fields.resolution is not None:
        if not rules.resolutions:
            errors.append(FieldError("resolution", f"is not offered by {rules.name}"))
        elif normalise_resolution(fields.resolution) not in rules.resolutions:
            allowed = _listed(rules.resolutions)
            errors.append(FieldError("resolution", f"must be {allowed} for {rules.name}"))
    if fields.quality is not None:
        if not rules.qualities:
            errors.append(FieldError("quality", f"is not offered by {rules.name}"))
        elif fields.quality not in rules.qualities:
            errors.append(FieldError("quality", f"must be {_listed(rules.qualities)}"))
    if fields.n is not None and not 1 <= fields.n <= rules.max_n:
        allowed = "1" if rules.max_n == 1 else f"from 1 to {rules.max_n}"
        errors.append(FieldError("n", f"must be {allowed} for {rules.name}"))
    return errors


def _image_problems(fields: RequestFields, rules: ModelRules) -> list[FieldError]:
    errors = []
    if fields.image_urls is not None:
        if not 1 <= len(fields.image_urls) <= MAX_IMAGE_URLS:
            errors.append(FieldError("image_urls", f"must hold 1 to {MAX_IMAGE_URLS} URLs"))
        for index, url in enumerate(fields.image_urls):
            if problem := url_problem(url):
                errors.append(FieldError(f"image_urls.{index}", problem))
    if fields.mask_url is not None:
        if not rules.takes_mask:
            errors.append(FieldError("mask_url", f"is not offered by {rules.name}"))
        else:
            if problem := url_problem(fields.mask_url):
                errors.append(FieldError("mask_url", problem))
            if not fields.image_urls:
                errors.append(
                    FieldError("mask_url", "needs image_urls: it masks a reference image")
                )
    return errors


def check(model: str, fields: RequestFields) -> list[FieldError]:
    """Every rule of `model` that the request breaks; empty when it may be sent."""
    rules = RULES.get(model)
    if rules is None:
        return [FieldError("model", f"must be one of {', '.join(KNOWN_MODELS)}")]
    errors: list[FieldError] = []
    if fields.prompt is not None:
        errors += [
            FieldError("prompt", reason) for reason in _prompt_problems(fields.prompt, rules)
        ]
    if fields.size is not None:
        errors += [FieldError("size", reason) for reason in _size_problems(fields.size, rules)]
    return errors + _option_problems(fields, rules) + _image_problems(fields, rules)


def judgeable_fields(raw: object, failed: set[str]) -> tuple[str, RequestFields] | None:
    """The model and the fields of a raw request body that the rules can still judge
    when other fields (named in `failed`) were refused for their type or content."""
    if not isinstance(raw, dict):
        return None
    model = raw.get("model", DEFAULT_MODEL)
    if not isinstance(model, str) or "model" in failed:
        return None

    def given(name: str, kind: type) -> Any:
        value = raw.get(name)
        return value if name not in failed and type(value) is kind else None

    urls = given("image_urls", list)
    if urls is not None and not all(isinstance(url, str) for url in urls):
        urls = None
    fields = RequestFields(
        prompt=given("prompt", str),
        size=given("size", str),
        resolution=given("resolution", str),
        quality=given("quality", str),
        n=given("n", int),
        image_urls=urls,
        # A mask is judged against its reference images: not without them.
        mask_url=given("mask_url", str) if "image_urls" not in failed else None,
    )
    return model, fields
