"""What one process holds for its lifetime: built in the lifespan, closed at exit."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.db import SessionFactory, create_engine, create_session_factory
from app.events.bus import EventBus
from app.fetch import SafeFetcher
from app.services.callback_batches import ConfirmationBatches, SnapshotBatches
from app.services.reconcile import Reconciler
from app.storage import Storage, storage_from_url
from app.upstream import DEFAULT_TIMEOUT, RetryPolicy, StarMagicClient
from app.variant_renders import OnDemandRenders
from app.webhooks.endpoints import Endpoints


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: SessionFactory
    http: httpx.AsyncClient
    starmagic: StarMagicClient
    storage: Storage
    fetcher: SafeFetcher
    reconciler: Reconciler
    webhooks: Endpoints
    events: EventBus = field(default_factory=EventBus)
    # The webhook queries the provider itself only where the loops run (RUN_BACKGROUND);
    # otherwise `imagetasks worker` claims due confirmations in batches.
    confirms_in_process: bool = True
    variant_renders: OnDemandRenders = field(default_factory=OnDemandRenders)
    # PostgreSQL: terminal callbacks arriving together are decided by one statement.
    callback_batches: ConfirmationBatches | None = None
    # PostgreSQL with confirmation off: they are applied together, in one transaction.
    snapshot_batches: SnapshotBatches | None = None
    closers: list[object] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        http: httpx.AsyncClient | None = None,
        retry: RetryPolicy | None = None,
    ) -> Runtime:
        """Wire the parts from the settings; nothing connects until first use."""
        engine = create_engine(settings.database_url)
        sessions = create_session_factory(engine)
        postgres = engine.dialect.name == "postgresql"
        http = http or httpx.AsyncClient(
            timeout=DEFAULT_TIMEOUT,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            headers={"User-Agent": "imagetasks"},
        )
        starmagic = StarMagicClient(
            http,
            base_url=settings.starmagic_base_url,
            api_key=settings.starmagic_api_key,
            retry=retry,
        )
        return cls(
            settings=settings,
            engine=engine,
            sessions=sessions,
            http=http,
            starmagic=starmagic,
            storage=storage_from_url(settings.storage_url),
            fetcher=SafeFetcher(
                allow_private=settings.download_allow_private_networks,
                max_bytes=settings.max_image_bytes,
            ),
            reconciler=Reconciler(sessions, starmagic, settings),
            webhooks=Endpoints(engine, settings),
            confirms_in_process=settings.run_background,
            callback_batches=ConfirmationBatches(engine) if postgres else None,
            snapshot_batches=SnapshotBatches(engine) if postgres else None,
        )

    async def aclose(self) -> None:
        """Close everything in the reverse order of use."""
        await self.events.aclose()
        if self.callback_batches is not None:
            await self.callback_batches.aclose()
        if self.snapshot_batches is not None:
            await self.snapshot_batches.aclose()
        await self.reconciler.aclose()
        await self.fetcher.aclose()
        await self.storage.aclose()
        await self.http.aclose()
        await self.engine.dispose()
