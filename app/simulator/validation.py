"""The provider's request rules and its error shape.

A body that is not a JSON object, or a field of the wrong JSON type, answers
422; a well-typed value the provider refuses (unknown model, size outside the
enum, n other than 1, a bad callback URL…) answers 400. Both carry
``{"error": {"code", "message", "type", "param"}}``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MODELS = ("gpt-image-1.5", "gpt-image-2")
SIZES = ("1:1", "2:3", "3:2", "1024x1024", "1024x1536", "1536x1024")
QUALITIES = ("low", "medium", "high")
MAX_PROMPT_TOKENS = 2000
MAX_CALLBACK_URL = 2048
MAX_IMAGE_URLS = 16


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
    """A submit request that passed the provider's rules."""

    model: str
    prompt: str
    size: str | None
    quality: str
    image_urls: tuple[str, ...]
    callback_url: str | None


def _bad(param: str, message: str, code: str = "invalid_parameter") -> ProviderError:
    return ProviderError(400, code, message, param=param)


def _wrong_type(param: str, expected: str) -> ProviderError:
    return ProviderError(422, "invalid_type", f"{param} must be {expected}", param=param)


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _wrong_type(name, "a string")
    return value


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


def validate_submission(body: object, allow_http: bool) -> Submission:
    """Apply the provider's rules to a submit body, raising ProviderError on the first breach."""
    if not isinstance(body, dict):
        raise ProviderError(422, "invalid_body", "the request body must be a JSON object")
    model = _optional_str(body, "model")
    if model is None:
        raise _bad("model", "model is required", "missing_parameter")
    if model not in MODELS:
        raise _bad("model", f"model must be one of {', '.join(MODELS)}", "model_not_found")
    prompt = _optional_str(body, "prompt")
    if prompt is None or not prompt.strip():
        raise _bad("prompt", "prompt is required and must not be empty", "missing_parameter")
    # Roughly four characters a token: close enough to refuse what the provider refuses.
    if len(prompt) > MAX_PROMPT_TOKENS * 4:
        raise _bad("prompt", f"prompt is limited to {MAX_PROMPT_TOKENS} tokens")
    size = _optional_str(body, "size")
    if size is not None and size not in SIZES:
        raise _bad("size", f"size must be one of {', '.join(SIZES)}")
    quality = _optional_str(body, "quality")
    if quality is None:
        quality = "high"
    if quality not in QUALITIES:
        raise _bad("quality", f"quality must be one of {', '.join(QUALITIES)}")
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise _wrong_type("n", "an integer")
    if n not in (None, 1):
        raise _bad("n", "n must be 1")
    urls = body.get("image_urls")
    if urls is not None:
        if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
            raise _wrong_type("image_urls", "a list of strings")
        if not 1 <= len(urls) <= MAX_IMAGE_URLS:
            raise _bad("image_urls", f"image_urls takes 1 to {MAX_IMAGE_URLS} URLs")
        for url in urls:
            _check_url("image_urls", url, allow_http, public_only=False)
    callback_url = _optional_str(body, "callback_url")
    if callback_url is not None:
        if len(callback_url) > MAX_CALLBACK_URL:
            raise _bad("callback_url", f"callback_url is limited to {MAX_CALLBACK_URL} characters")
        _check_url("callback_url", callback_url, allow_http, public_only=True)
    return Submission(
        model=model,
        prompt=prompt,
        size=size,
        quality=quality,
        image_urls=tuple(urls or ()),
        callback_url=callback_url,
    )
