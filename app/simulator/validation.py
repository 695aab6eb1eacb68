"""The provider's request rules and its error shape.

A body that is not a JSON object, or a field of the wrong JSON type, answers
422; a well-typed value the model refuses (unknown model, size outside its
list, n out of range, a field the model does not take, a bad callback URL…)
answers 400. Both carry ``{"error": {"code", "message", "type", "param"}}``.
Each model's own limits live in ``app.simulator.models``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from app.simulator import sizes
from app.simulator.models import MODELS, ModelRules, output_size

MAX_CALLBACK_URL = 2048
MAX_IMAGE_URLS = 16
CHARS_PER_TOKEN = 4  # a rough token count, close enough to refuse what the provider refuses


class ProviderError(Exception):
    """An error answered in the provider's shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.type = type_
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body the provider sends."""
        error: dict[str, Any] = {"code": self.code, "message": self.message, "type": self.type}
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}


@dataclass(frozen=True)
class Submission:
    """A submit request that passed its model's rules, defaults applied."""

    model: str
    prompt: str
    size: str | None
    quality: str | None  # None where the model has no quality setting
    image_urls: tuple[str, ...]
    callback_url: str | None
    n: int = 1
    resolution: str | None = None
    mask_url: str | None = None  # None as well when ignored for lack of image_urls
    width: int = 1024  # the output size the request implies
    height: int = 1024


def _bad(param: str, message: str, code: str = "invalid_parameter") -> ProviderError:
    return ProviderError(400, code, message, param=param)


def _wrong_type(param: str, expected: str) -> ProviderError:
    return ProviderError(422, "invalid_type", f"{param} must be {expected}", param=param)


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _wrong_type(name, "a string")
    return value


def _not_offered(rules: ModelRules, param: str) -> ProviderError:
    return _bad(param, f"{param} is not supported by {rules.name}", "unsupported_parameter")


def _is_internal(host: str) -> bool:
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: the real provider resolves it; the simulator does not
    return not address.is_global


def _check_url(param: str, url: str, allow_http: bool, *, public_only: bool) -> None:
    parts = urlsplit(url)
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes or not parts.hostname:
        raise _bad(param, f"{param} must be an {' or '.join(schemes)} URL")
    if public_only and not allow_http and _is_internal(parts.hostname):
        raise _bad(param, f"{param} must not point at an internal address", "forbidden_address")


def _rules(body: dict[str, Any]) -> ModelRules:
    model = _optional_str(body, "model")
    if model is None:
        raise _bad("model", "model is required", "missing_parameter")
    if model not in MODELS:
        raise _bad("model", f"model must be one of {', '.join(MODELS)}", "model_not_found")
    return MODELS[model]


def _prompt(rules: ModelRules, body: dict[str, Any]) -> str:
    prompt = _optional_str(body, "prompt")
    if prompt is None or not prompt.strip():
        raise _bad("prompt", "prompt is required and must not be empty", "missing_parameter")
    # len() counts code points, the unit the GPT Image 2 pages name.
    limit = rules.prompt_limit * (CHARS_PER_TOKEN if rules.prompt_unit == "tokens" else 1)
    if len(prompt) > limit:
        raise _bad("prompt", f"prompt is limited to {rules.prompt_limit} {rules.prompt_unit}")
    return prompt


def _size(rules: ModelRules, body: dict[str, Any]) -> str | None:
    size = _optional_str(body, "size")
    if size is None:
        return "auto" if rules.auto_size else None
    if (size == "auto" and rules.auto_size) or size in rules.named_sizes or size in rules.ratios:
        return size
    if rules.explicit_sizes:
        explicit = sizes.parse_wxh(size)
        if explicit is not None:
            problem = sizes.wxh_problem(*explicit)
            if problem is not None:
                raise _bad("size", f"size {size}: {problem}")
            return size
    choices = [*(["auto"] if rules.auto_size else []), *rules.named_sizes, *rules.ratios]
    extra = " or WxH" if rules.explicit_sizes else ""
    raise _bad("size", f"size must be one of {', '.join(choices)}{extra} for {rules.name}")


def _resolution(rules: ModelRules, body: dict[str, Any]) -> str | None:
    resolution = _optional_str(body, "resolution")
    if not rules.resolutions:
        if resolution is not None:
            raise _not_offered(rules, "resolution")
        return None
    if resolution is None:
        return rules.resolutions[0]
    if resolution.upper() not in rules.resolutions:
        allowed = ", ".join(rules.resolutions)
        raise _bad("resolution", f"resolution must be one of {allowed} for {rules.name}")
    return resolution.upper()


def _quality(rules: ModelRules, body: dict[str, Any]) -> str | None:
    quality = _optional_str(body, "quality")
    if not rules.qualities:
        if quality is not None:
            raise _not_offered(rules, "quality")
        return None
    if quality is None:
        return rules.default_quality
    if quality not in rules.qualities:
        raise _bad("quality", f"quality must be one of {', '.join(rules.qualities)}")
    return quality


def _n(rules: ModelRules, body: dict[str, Any]) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int):
        raise _wrong_type("n", "an integer")
    if not 1 <= n <= rules.max_n:
        allowed = "1" if rules.max_n == 1 else f"1 to {rules.max_n}"
        raise _bad("n", f"n must be {allowed} for {rules.name}")
    return n


def _image_urls(body: dict[str, Any], allow_http: bool) -> tuple[str, ...]:
    urls = body.get("image_urls")
    if urls is None:
        return ()
    if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
        raise _wrong_type("image_urls", "a list of strings")
    if not 1 <= len(urls) <= MAX_IMAGE_URLS:
        raise _bad("image_urls", f"image_urls takes 1 to {MAX_IMAGE_URLS} URLs")
    for url in urls:
        _check_url("image_urls", url, allow_http, public_only=False)
    return tuple(urls)


def _mask_url(
    rules: ModelRules, body: dict[str, Any], image_urls: tuple[str, ...], allow_http: bool
) -> str | None:
    mask_url = _optional_str(body, "mask_url")
    if mask_url is None:
        return None
    if not rules.masks:
        raise _not_offered(rules, "mask_url")
    if not image_urls:
        return None  # the provider ignores a mask without reference images
    _check_url("mask_url", mask_url, allow_http, public_only=False)
    return mask_url


def _callback_url(body: dict[str, Any], allow_http: bool) -> str | None:
    callback_url = _optional_str(body, "callback_url")
    if callback_url is not None:
        if len(callback_url) > MAX_CALLBACK_URL:
            raise _bad("callback_url", f"callback_url is limited to {MAX_CALLBACK_URL} characters")
        _check_url("callback_url", callback_url, allow_http, public_only=True)
    return callback_url


def validate_submission(body: object, allow_http: bool) -> Submission:
    """Apply the model's rules to a submit body, raising ProviderError on the first breach."""
    if not isinstance(body, dict):
        raise ProviderError(422, "invalid_body", "the request body must be a JSON object")
    rules = _rules(body)
    prompt = _prompt(rules, body)
    size = _size(rules, body)
    resolution = _resolution(rules, body)
    quality = _quality(rules, body)
    n = _n(rules, body)
    image_urls = _image_urls(body, allow_http)
    mask_url = _mask_url(rules, body, image_urls, allow_http)
    callback_url = _callback_url(body, allow_http)
    width, height = output_size(rules, size, resolution)
    return Submission(
        model=rules.name,
        prompt=prompt,
        size=size,
        quality=quality,
        image_urls=image_urls,
        callback_url=callback_url,
        n=n,
        resolution=resolution,
        mask_url=mask_url,
        width=width,
        height=height,
    )
