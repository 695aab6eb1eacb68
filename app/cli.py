"""The `imagetasks` command: run the service, its worker, migrations, the
simulator, the demo, and talk to a running service."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Coroutine
from types import FrameType
from typing import Annotated, Any

import typer
import uvicorn

from app.config import Settings, SettingsError, load_settings

cli = typer.Typer(
    help="imagetasks: StarMagic image generation with callbacks and durable storage.",
    no_args_is_help=True,
    add_completion=False,
)


def _settings_or_exit(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        report_settings_error(exc)
        raise typer.Exit(2) from None


def report_settings_error(exc: SettingsError) -> None:
    """Every problem on its own line on stderr, so one restart shows them all."""
    for problem in exc.problems:
        typer.echo(f"imagetasks: {problem}", err=True)


def run_migrations(database_url: str) -> str:
    """`alembic upgrade head` on DATABASE_URL; returns what it did (call it off the event loop)."""
    from app.schema_version import migrate as upgrade

    return upgrade(database_url)


@cli.command()
def migrate() -> None:
    """Apply the database migrations to DATABASE_URL and say what changed."""
    from app.config import load_database_settings

    try:
        url = load_database_settings().database_url
    except SettingsError as exc:
        report_settings_error(exc)
        raise typer.Exit(2) from None
    typer.echo(f"imagetasks: {migrate_or_exit(url)}")


def migrate_or_exit(url: str) -> str:
    """Run the migrations; one line on stderr and exit 1 when they cannot run."""
    from alembic.util import CommandError
    from sqlalchemy.exc import DBAPIError

    from app.db import DatabaseTooOld
    from app.schema_version import SchemaNewerThanCode

    try:
        return run_migrations(url)
    except (OSError, DBAPIError, SchemaNewerThanCode, CommandError, DatabaseTooOld) as exc:
        lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        typer.echo(f"imagetasks: cannot migrate the database: {reason}", err=True)
        raise typer.Exit(1) from None


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8000,
    sandbox: Annotated[
        bool,
        typer.Option(help="Run against a built-in StarMagic simulator; no configuration needed."),
    ] = False,
    background: Annotated[
        bool | None,
        typer.Option(
            help="Also run the download worker and reconciler in this process "
            "(default: RUN_BACKGROUND, itself true by default)."
        ),
    ] = None,
) -> None:
    """Run the HTTP service (and, by default, its background worker)."""
    from app.logging import configure_logging, uvicorn_log_config
    from app.main import create_app

    simulator, announcement = None, None
    if sandbox:
        from app.sandbox import banner, prepare_sandbox

        try:
            settings, simulator = prepare_sandbox(host, port)
        except SettingsError as exc:  # e.g. a LOG_LEVEL the sandbox cannot use either
            report_settings_error(exc)
            raise typer.Exit(2) from None
        migrate_or_exit(settings.database_url)
        announcement = banner(settings)
    else:
        overrides = {} if background is None else {"run_background": background}
        settings = _settings_or_exit(**overrides)
    configure_logging(settings)
    app = create_app(settings, simulator=simulator)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=uvicorn_log_config(),
        proxy_headers=False,  # the app applies TRUSTED_PROXIES itself
        access_log=False,  # the app writes its own, with the request id
        timeout_graceful_shutdown=30,
    )
    server = _AnnouncingServer(config, announcement)
    try:
        server.run()
    except SystemExit:
        if server.started or server.lifespan_failed:
            raise
    if not server.started and not server.lifespan_failed:
        typer.echo(
            f"imagetasks: could not listen on {host}:{port} (is another process using it? "
            "choose another with --port, or `make run PORT=8010`)",
            err=True,
        )
        raise typer.Exit(1)


class _AnnouncingServer(uvicorn.Server):
    """uvicorn that prints the sandbox's banner only once the socket is bound."""

    def __init__(self, config: uvicorn.Config, announcement: str | None) -> None:
        super().__init__(config)
        self._announcement = announcement

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._announcement:
            print(self._announcement, file=sys.stderr, flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Event streams never end by themselves: end them, so shutdown need not wait.
        runtime = getattr(getattr(self.config.app, "state", None), "runtime", None)
        if runtime is not None:
            runtime.events.shut_down()
        super().handle_exit(sig, frame)

    @property
    def lifespan_failed(self) -> bool:
        """The app's own startup failed (it logged why); not a socket problem."""
        return bool(getattr(getattr(self, "lifespan", None), "should_exit", False))


@cli.command()
def worker() -> None:
    """Run only the download worker and the reconciler (no HTTP)."""
    from app.logging import configure_logging
    from app.worker import run_worker

    settings = _settings_or_exit()
    configure_logging(settings)
    run_event_loop(run_worker(settings))


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop where it is installed, as `serve` runs (uvicorn picks it),
    else on asyncio's own loop: the worker's provider queries, downloads and statements
    spend a good part of their CPU in the loop's transports."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


@cli.command()
def simulator(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 9000,
    time_scale: Annotated[
        float, typer.Option(help="Multiply the simulated processing time (0.05 = 20x faster).")
    ] = 1.0,
    api_key: Annotated[str, typer.Option(help="The Bearer key it accepts.")] = "sim-key",
    allow_http_callbacks: Annotated[
        bool, typer.Option(help="Accept http:// callback URLs (local testing).")
    ] = True,
    image_size: Annotated[
        str | None,
        typer.Option(help="Serve every image at this WxH (e.g. 64x64), not the requested size."),
    ] = None,
    body_shape: Annotated[
        str,
        typer.Option(
            help="Shape of query answers and callbacks: published (the provider's documented "
            "task object), envelope or bare (the enveloped shape and its data object)."
        ),
    ] = "published",
    callback_retry_delays: Annotated[
        str,
        typer.Option(
            envvar="SIMULATOR_CALLBACK_RETRY_DELAYS",
            help="Seconds before each retry of a failed callback, comma-separated "
            "(the provider's policy: 1,2,4; empty: no retries).",
        ),
    ] = "1,2,4",
) -> None:
    """Run the StarMagic simulator alone."""
    from app.simulator import SimulatorConfig, run_simulator
    from app.simulator.sizes import parse_wxh

    pinned = parse_wxh(image_size) if image_size is not None else None
    if image_size is not None and pinned is None:
        raise typer.BadParameter("expected WxH, e.g. 64x64", param_hint="--image-size")
    try:
        delays = tuple(float(d) for d in callback_retry_delays.split(",") if d.strip())
    except ValueError:
        raise typer.BadParameter(
            "expected seconds separated by commas, e.g. 1,2,4",
            param_hint="--callback-retry-delays",
        ) from None
    try:
        config = SimulatorConfig(
            api_key=api_key,
            public_base_url=f"http://{host}:{port}",
            time_scale=time_scale,
            allow_http_callbacks=allow_http_callbacks,
            image_size=pinned,
            body_shape=body_shape,  # type: ignore[arg-type]  # checked by SimulatorConfig
            retry_delays=delays,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    run_simulator(host, port, config)


@cli.command()
def demo(
    prompt: Annotated[str, typer.Option(help="What to draw.")] = "a lighthouse at dawn, watercolor",
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 60,
) -> None:
    """Start the sandbox on a free port, follow one task to its stored image, then stop.

    Data stays in ./var (the token in ./.env), where `imagetasks serve --sandbox` finds it.
    """
    from app.demo import run_demo

    raise typer.Exit(run_demo(prompt=prompt, timeout=timeout))


def main() -> None:
    """Entry point of the `imagetasks` script."""
    from app.client import register

    register(cli)
    try:
        cli()
    except KeyboardInterrupt:
        sys.exit(130)
