"""The confirmation loop's `behind` says only what its last look found."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.services.reconcile import Reconciler
from app.upstream import StarMagicClient
from tests.conftest import make_settings

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _broken_factory() -> Any:
    raise ConnectionError("the database is unreachable")


async def test_a_failed_claim_does_not_leave_the_worker_behind(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Behind, then the claim fails (and keeps failing): no confirmation runs, so
    downloads and variants must not keep giving way to them."""
    reconciler = Reconciler(
        _broken_factory,  # type: ignore[arg-type]
        StarMagicClient(None, base_url="http://unused", api_key="unused"),  # type: ignore[arg-type]
        make_settings(sqlite_url, tmp_path),
    )
    reconciler.behind = True  # the last look found more due than one claim takes
    with pytest.raises(ConnectionError):
        await reconciler.start_confirmations()
    assert not reconciler.behind
