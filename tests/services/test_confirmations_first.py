"""The confirmation loop's `behind` says only what its last look found; an answer
applied one by one fails as it always did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from app.db import create_engine, create_session_factory
from app.models import TaskStatus, utcnow
from app.repository import PollClaim
from app.schemas import Snapshot
from tests.conftest import make_settings
from tests.helpers import offline_reconciler

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _broken_factory() -> Any:
    raise ConnectionError("the database is unreachable")


async def test_a_failed_claim_does_not_leave_the_worker_behind(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Behind, then the claim fails (and keeps failing): no confirmation runs, so
    downloads and variants must not keep giving way to them."""
    reconciler = offline_reconciler(_broken_factory, make_settings(sqlite_url, tmp_path))
    reconciler.behind = True  # the last look found more due than one claim takes
    with pytest.raises(ConnectionError):
        await reconciler.start_confirmations()
    assert not reconciler.behind


async def test_one_answer_applied_one_by_one_is_tried_once_as_before(
    database_url: str, tmp_path: Path
) -> None:
    """SQLite, or an answer the batch statements do not take (one that leaves its task
    active): applying it fails, and it is left to its lease, tried once, as before
    answers were ever decided together."""
    engine = create_engine(database_url)
    reconciler = offline_reconciler(
        create_session_factory(engine), make_settings(database_url, tmp_path)
    )
    tried: list[str] = []

    async def failing(db: Any, task: PollClaim, *args: Any) -> Any:
        tried.append(task.id)
        raise RuntimeError("the answer cannot be written")

    reconciler._apply_one = failing  # type: ignore[method-assign]
    now = utcnow()
    claim = PollClaim("tsk_one", "task-unified-1", now, 0, now, now)
    cases = [Snapshot(TaskStatus.PROCESSING, upstream_id="task-unified-1", progress=50)]
    if engine.dialect.name == "sqlite":
        cases.append(Snapshot(TaskStatus.COMPLETED, upstream_id="task-unified-1"))
    try:
        for snapshot in cases:
            tried.clear()
            with capture_logs() as logs:
                await reconciler._apply_answers([(claim, snapshot)])
            assert tried == ["tsk_one"]
            assert [line["event"] for line in logs] == ["poll_apply_failed"]
    finally:
        await engine.dispose()


async def test_behind_holds_while_the_next_claim_is_out(sqlite_url: str, tmp_path: Path) -> None:
    """The download loop may look while a claim is out: it must still see the loop
    behind (a backlog's claims come back to back)."""
    engine = create_engine(sqlite_url)
    reconciler = offline_reconciler(
        create_session_factory(engine), make_settings(sqlite_url, tmp_path)
    )
    seen: list[bool] = []

    async def claim(limit: int, *, confirmations_only: bool) -> list[PollClaim]:
        seen.append(reconciler.behind)
        return []

    reconciler._claim = claim  # type: ignore[method-assign]
    reconciler.behind = True
    try:
        assert await reconciler.start_confirmations() == 0
    finally:
        await engine.dispose()
    assert seen == [True]
    assert not reconciler.behind  # the claim found none left


async def test_queries_all_out_with_nothing_more_due_is_not_behind(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every query slot taken by a slow provider (waiting on the network, not on the
    CPU) while the last claim found all there was: downloads need not give way."""
    from app.services import reconcile

    reconciler = offline_reconciler(_broken_factory, make_settings(sqlite_url, tmp_path))
    monkeypatch.setattr(reconciler, "_in_flight", reconcile.CONFIRMS_IN_FLIGHT)
    assert await reconciler.start_confirmations() == 0  # no room: nothing claimed
    assert not reconciler.behind
    reconciler.behind = True  # the last claim found more due than it could take
    assert await reconciler.start_confirmations() == 0
    assert reconciler.behind  # still so: nothing has been confirmed since
