"""Fault injection for the StarMagic simulator.

A task's faults are the global defaults (``SimulatorConfig.default_faults``,
replaced at run time by ``POST /_sim/faults``) overridden by directives found
in its prompt. Grammar (whitespace around items is ignored; several tokens in
one prompt are applied left to right, later wins)::

    token     := "[sim:" directive ("," directive)* "]"
    directive := NAME | NAME "=" VALUE     (a bare NAME sets a flag; flags also take true/false)

Callbacks and query answers
    dup=N                 deliver the terminal callback N times, one after another
    concurrent_dup=N      deliver it N times at once (with dup: dup rounds of N)
    late_processing       after the terminal callback(s), also deliver a stale processing snapshot
    drop                  send no callback at all
    body=published|envelope|bare
                          shape of the task's callbacks and query answers (default: the
                          config's body_shape): the published bare task object with
                          ``results: [url, ...]``; the {"code", "data"} envelope with
                          ``result.images[].url`` and ``expires_at``; or that data object alone
Outcome and timing
    outcome=completed|failed|cancelled
    error_code=CODE       a failed task's error code, one of the published task error codes
                          (``TASK_ERROR_CODES``; default generation_failed_no_content)
    eta=SECONDS           estimated_time for this task (simulated seconds, times time_scale)
    submit_status=CODE    refuse the submission with this status and its published code
                          (``SUBMIT_REFUSALS``; others are ``http_<status>``; 429 carries
                          Retry-After); no task
    submit_delay=SECONDS  accept the task, but answer the submit call SECONDS later (real time)
Result and image links (every image of the task)
    url=string|list       shape of result.images[].url in the envelope and bare shapes
    image_slow=SECONDS    the image body trickles out over SECONDS (real time)
    image_503=N           the task's first N image GETs (on live links) answer 503
    image_expired         the first links answer 403; a query after a refusal hands out new links
    image_size=BYTES      the PNG is padded with a private ancillary chunk to exactly BYTES
    not_image             the link serves an HTML page labelled image/png
    oversize[=V]          stream (bare default): a chunked body of config.oversize_bytes, no
                          Content-Length; header: Content-Length claims oversize_bytes, the body
                          is the small PNG
    redirect_to=URL       the link answers 302 to URL (which cannot contain "," or "]")

Example: ``"a red fox [sim:dup=3,late_processing,body=envelope,url=list]"``. An unknown name
or a bad value makes the submission fail with 400, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Outcome = Literal["completed", "failed", "cancelled"]
Shape = Literal["published", "envelope", "bare"]
SHAPES: tuple[Shape, ...] = ("published", "envelope", "bare")

# The published task error codes: first those the caller can fix, then the retryable ones.
TASK_ERROR_CODES = (
    "content_policy_violation",
    "invalid_parameters",
    "image_processing_error",
    "image_dimension_mismatch",
    "request_cancelled",
    "generation_failed_no_content",
    "service_error",
    "generation_timeout",
    "resource_exhausted",
    "quota_exceeded",
    "service_unavailable",
    "resource_not_found",
    "unknown_error",
)
DEFAULT_ERROR_CODE = "generation_failed_no_content"

# Submit refusals by their published HTTP status: (code, type).
SUBMIT_REFUSALS = {
    400: ("invalid_parameters", "invalid_request_error"),
    401: ("unauthorized", "authentication_error"),
    402: ("quota_exceeded", "insufficient_quota"),
    403: ("permission_denied", "permission_error"),
    429: ("rate_limit_exceeded", "rate_limit_error"),
    500: ("internal_error", "server_error"),
}

_TOKEN = re.compile(r"\[sim:([^\]]*)\]")
_TRUE = {"", "1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class FaultError(ValueError):
    """A directive that cannot be parsed or has a value out of range."""


@dataclass(frozen=True)
class Fault:
    """Misbehaviours applied to one task; the defaults are a well-behaved provider."""

    dup: int = 1
    concurrent_dup: int = 1
    late_processing: bool = False
    drop: bool = False
    body: Shape | None = None  # None: the simulator's configured body_shape
    outcome: Outcome = "completed"
    error_code: str = DEFAULT_ERROR_CODE
    eta: int | None = None
    submit_status: int | None = None
    submit_delay: float = 0.0
    url: Literal["string", "list"] = "string"
    image_slow: float = 0.0
    image_503: int = 0
    image_expired: bool = False
    image_size: int | None = None
    not_image: bool = False
    oversize: Literal["stream", "header"] | None = None
    redirect_to: str | None = None

    def with_prompt(self, prompt: str) -> Fault:
        """These faults overridden by the prompt's ``[sim:…]`` directives."""
        return dataclasses.replace(self, **parse_prompt(prompt))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return dataclasses.asdict(self)


def _flag(value: str | None) -> bool:
    text = (value or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise FaultError(f"expected true or false, got {value!r}")


def _int(low: int, high: int) -> Callable[[str | None], int]:
    def parse(value: str | None) -> int:
        try:
            number = int(value or "")
        except ValueError:
            raise FaultError(f"expected an integer, got {value!r}") from None
        if not low <= number <= high:
            raise FaultError(f"expected {low}..{high}, got {number}")
        return number

    return parse


def _float(low: float, high: float) -> Callable[[str | None], float]:
    def parse(value: str | None) -> float:
        try:
            number = float(value or "")
        except ValueError:
            raise FaultError(f"expected a number, got {value!r}") from None
        if not low <= number <= high:
            raise FaultError(f"expected {low}..{high}, got {number}")
        return number

    return parse


def _choice(*choices: str, bare: str | None = None) -> Callable[[str | None], str]:
    def parse(value: str | None) -> str:
        if value is None and bare is not None:
            return bare
        if value not in choices:
            raise FaultError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def _url(value: str | None) -> str:
    if not value or not value.startswith(("http://", "https://")):
        raise FaultError(f"expected an http(s) URL, got {value!r}")
    return value


_PARSERS: dict[str, Callable[[str | None], Any]] = {
    "dup": _int(1, 50),
    "concurrent_dup": _int(1, 50),
    "late_processing": _flag,
    "drop": _flag,
    "body": _choice(*SHAPES),
    "outcome": _choice("completed", "failed", "cancelled"),
    "error_code": _choice(*TASK_ERROR_CODES),
    "eta": _int(0, 86_400),
    "submit_status": _int(400, 599),
    "submit_delay": _float(0, 600),
    "url": _choice("string", "list"),
    "image_slow": _float(0, 600),
    "image_503": _int(0, 1000),
    "image_expired": _flag,
    "image_size": _int(0, 1 << 34),
    "not_image": _flag,
    "oversize": _choice("stream", "header", bare="stream"),
    "redirect_to": _url,
}


def parse_directive(name: str, value: str | None) -> Any:
    """The typed value of one directive; ``value`` is None for a bare name."""
    parser = _PARSERS.get(name)
    if parser is None:
        raise FaultError(f"unknown simulator directive {name!r}")
    try:
        return parser(value)
    except FaultError as exc:
        raise FaultError(f"{name}: {exc}") from None


def parse_prompt(prompt: str) -> dict[str, Any]:
    """Field overrides from every ``[sim:…]`` token in ``prompt``."""
    overrides: dict[str, Any] = {}
    for match in _TOKEN.finditer(prompt):
        for item in match.group(1).split(","):
            if not item.strip():
                continue
            name, sep, value = item.partition("=")
            overrides[name.strip()] = parse_directive(name.strip(), value.strip() if sep else None)
    return overrides


def fault_from_mapping(values: Mapping[str, object]) -> Fault:
    """Faults from a JSON object of directives, e.g. ``{"dup": 2, "drop": true}``."""
    overrides: dict[str, Any] = {}
    for name, raw in values.items():
        if name not in _PARSERS:
            raise FaultError(f"unknown simulator directive {name!r}")
        if raw is None:
            continue
        text = None if raw is True else "false" if raw is False else str(raw)
        overrides[name] = parse_directive(name, text)
    return dataclasses.replace(Fault(), **overrides)
