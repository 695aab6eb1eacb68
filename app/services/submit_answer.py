"""The provider's usual answer to a submission, applied by one prepared statement.

Almost every submit answer says `pending` about the task we have just inserted
(still `submitting`). Building the state machine's guarded UPDATE for it on
every request costs more than running it, so it is built once per shape: by
`transition` itself, from a stand-in snapshot whose values are then turned into
bind parameters. The rules stay those of `app.services.snapshots`; only the
values change from one request to the next. Anything else goes the general way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import BindParameter, ColumnElement, and_, bindparam
from sqlalchemy.sql import visitors

from app.models import TaskStatus
from app.repository import TASKS, owns_upstream_id_sql
from app.schemas import Snapshot
from app.services.snapshots import transition

# Stand-ins no real answer carries; each becomes the bind parameter of its name
# (or what `parametrize` is told to make of it: `snapshot_batches` uses them too).
NOW = datetime(1971, 2, 3, 4, 5, 6, 789012, tzinfo=UTC)
POLL_AFTER = timedelta(days=1234, microseconds=567)
STAND_INS: dict[str, Any] = {
    "now": NOW,
    "due": NOW + POLL_AFTER,
    "progress": 987_654_321,
    "estimated_time": 987_654_322,
    "upstream_id": "\x00stand-in upstream id",
    "error_code": "\x00stand-in error code",
    "error_message": "\x00stand-in error message",
}
USAGE: dict[str, Any] = {"\x00stand-in": "usage"}
_COLUMN_OF = {
    "now": "updated_at",
    "due": "next_poll_at",
    "upstream_id": "upstream_task_id",
    "task_id": "id",
}


@dataclass(frozen=True)
class Shape:
    """What changes the statement (not just its values): which fields the answer has."""

    can_cancel: bool
    usage: bool
    estimated_time: bool

    @classmethod
    def of(cls, snapshot: Snapshot) -> Shape:
        return cls(
            snapshot.can_cancel is not None,
            snapshot.usage is not None,
            snapshot.estimated_time is not None,
        )


def _name_of(value: Any) -> str | None:
    for name, stand_in in STAND_INS.items():
        if type(value) is type(stand_in) and value == stand_in:
            return name
    if value == USAGE:
        return "usage"
    return None


def _param(name: str) -> BindParameter[Any]:
    column = TASKS.c[_COLUMN_OF.get(name, name)]
    return bindparam(name, type_=column.type)


def parametrize(element: Any, make: Callable[[str], Any] = _param) -> Any:
    """`element` with every stand-in value (a literal, or a bind inside an expression)
    replaced by `make(its name)`: by default its named parameter."""
    if not isinstance(element, ColumnElement):
        name = _name_of(element)
        return make(name) if name else element

    def replace(element: Any, **_: Any) -> Any:
        if isinstance(element, BindParameter):
            name = _name_of(element.value)
            if name:
                return make(name)
        return None

    return visitors.replacement_traverse(element, {}, replace)


def template(shape: Shape) -> tuple[ColumnElement[bool], dict[str, Any]]:
    """The guard and the values `transition` gives a pending answer of this shape,
    over named parameters (see `params`), guarded by `owns_upstream_id` too."""
    stand_in = Snapshot(
        status=TaskStatus.PENDING,
        upstream_id=STAND_INS["upstream_id"],
        progress=STAND_INS["progress"],
        estimated_time=STAND_INS["estimated_time"] if shape.estimated_time else None,
        can_cancel=True if shape.can_cancel else None,
        usage=USAGE if shape.usage else None,
    )
    condition, values = transition(stand_in, now=NOW, poll_after=POLL_AFTER)
    guard = and_(condition, owns_upstream_id_sql(_param("task_id"), _param("upstream_id")))
    parametrized = {key: parametrize(value) for key, value in values.items()}
    if shape.can_cancel:
        # A pending answer's can_cancel is stored as said (only a terminal one clears it).
        assert values["can_cancel"] is True
        parametrized["can_cancel"] = bindparam("can_cancel", type_=TASKS.c.can_cancel.type)
    return parametrize(guard), parametrized


def params(
    task_id: str, snapshot: Snapshot, *, now: datetime, poll_after: timedelta
) -> dict[str, Any]:
    """The values of `template`'s parameters for this answer."""
    values: dict[str, Any] = {
        "task_id": task_id,
        "now": now,
        "due": now + poll_after,
        "progress": snapshot.progress or 0,
        "upstream_id": snapshot.upstream_id,
    }
    if snapshot.estimated_time is not None:
        values["estimated_time"] = snapshot.estimated_time
    if snapshot.can_cancel is not None:
        values["can_cancel"] = snapshot.can_cancel
    if snapshot.usage is not None:
        values["usage"] = snapshot.usage
    return values
