"""The gallery's filters, read from the query string and checked one by one."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlencode

from starlette.datastructures import QueryParams

from app.models import ImageStatus, TaskStatus
from app.repository import TaskFilter

FIELDS = ("status", "image_status", "created_after", "created_before", "meta", "q")
_META_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_TEXT = 200


@dataclass
class GalleryFilters:
    """What the form said (to show it again), what it means, and what was wrong with it."""

    values: dict[str, str] = field(default_factory=dict)
    task_filter: TaskFilter = field(default_factory=TaskFilter)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return any(self.values.values())

    def query(self, **extra: str) -> str:
        """The filters (and `extra`) as a query string, for links and fetches."""
        pairs = {name: value for name, value in self.values.items() if value}
        pairs.update({name: value for name, value in extra.items() if value})
        return urlencode(pairs)


def _instant(raw: str) -> datetime:
    # <input type="datetime-local"> sends no zone: the console speaks UTC throughout.
    value = datetime.fromisoformat(raw)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse(params: QueryParams) -> GalleryFilters:
    """The filters in a query string; a bad one is named in `errors` and not applied."""
    result = GalleryFilters(values={name: (params.get(name) or "").strip() for name in FIELDS})
    values, errors = result.values, result.errors
    status = values["status"]
    if status and status not in {s.value for s in TaskStatus}:
        errors["status"] = f"unknown status {status[:40]!r}"
    image_status = values["image_status"]
    if image_status and image_status not in {s.value for s in ImageStatus}:
        errors["image_status"] = f"unknown image status {image_status[:40]!r}"
    instants: dict[str, datetime | None] = {}
    for name in ("created_after", "created_before"):
        instants[name] = None
        if values[name]:
            try:
                instants[name] = _instant(values[name])
            except (ValueError, OverflowError):  # overflow: an offset past year 1 or 9999
                errors[name] = "not a date and time (YYYY-MM-DDTHH:MM, UTC)"
    meta_key = meta_value = None
    if values["meta"]:
        key, sep, value = values["meta"].partition("=")
        if not sep or not _META_KEY.fullmatch(key.strip()):
            errors["meta"] = "write key=value (key: letters, digits, _ . : -)"
        elif len(value) > MAX_TEXT:
            errors["meta"] = f"the value is over {MAX_TEXT} characters"
        else:
            meta_key, meta_value = key.strip(), value.strip()
    if len(values["q"]) > MAX_TEXT:
        errors["q"] = f"over {MAX_TEXT} characters"
    for name in ("q", "meta"):
        if "\x00" in values[name] and name not in errors:
            # PostgreSQL text cannot hold one: the query would fail, not match nothing.
            errors[name] = "contains a NUL character"
    if errors:
        return result
    result.task_filter = TaskFilter(
        status=status or None,
        image_status=image_status or None,
        created_after=instants["created_after"],
        created_before=instants["created_before"],
        metadata_key=meta_key,
        metadata_value=meta_value,
        prompt_contains=values["q"] or None,
    )
    return result
