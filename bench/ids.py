"""Task ids in the service's format (`tsk_` + ULID) for a given creation time."""

from __future__ import annotations

import secrets
from datetime import datetime

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def task_id_at(created: datetime) -> str:
    """Like `app.services.tasks.new_task_id`, but for a chosen time (for seeding)."""
    value = (int(created.timestamp() * 1000) << 80) | secrets.randbits(80)
    return "tsk_" + "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))
