"""Async engine and sessions; SQLite gets WAL and immediate transactions."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    CTE,
    ColumnElement,
    MetaData,
    Select,
    Table,
    delete,
    event,
    select,
    tuple_,
)
from sqlalchemy.dialects.sqlite.base import SQLiteCompiler
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlmodel import SQLModel

# Stable constraint names, so migrations can drop and alter them on both databases.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SQLModel.metadata.naming_convention = NAMING_CONVENTION
metadata: MetaData = SQLModel.metadata

SessionFactory = async_sessionmaker[AsyncSession]


def picked_once(rows: Select[Any], name: str) -> CTE:
    """The rows a statement works on, picked and locked once (skipping rows another
    transaction holds): a MATERIALIZED CTE for its WHERE to match. As an IN subquery,
    PostgreSQL may rescan it for each row a nested loop reads (its pick when
    statistics say the table is small), and with SKIP LOCKED each rescan passes over
    the rows the statement has already changed and takes the next ones: past LIMIT,
    up to every row."""
    return rows.with_for_update(skip_locked=True).cte(name).prefix_with("MATERIALIZED")


async def delete_picked(
    db: AsyncConnection, table: Table, key: Sequence[ColumnElement[Any]], rows: Select[Any]
) -> int:
    """Delete the rows `rows` selects by `key` (a batch of a retention prune), picked
    once; how many went, counted from RETURNING: SQLite's driver reports no rowcount
    for a statement that starts with WITH."""
    doomed = picked_once(rows, "doomed")
    target = tuple_(*key) if len(key) > 1 else key[0]
    statement = delete(table).add_cte(doomed).where(target.in_(select(*doomed.c))).returning(key[0])
    return len((await db.execute(statement)).all())


# The oldest databases every statement here runs on: SQLite 3.35 brought RETURNING
# and `AS MATERIALIZED`, PostgreSQL 12 `AS MATERIALIZED` (`picked_once`, which every
# poll claim, download claim and retention prune uses). Older ones are refused up
# front, not left to fail those statements, in a loop, with a syntax error.
SQLITE_FLOOR = (3, 35, 0)
POSTGRES_FLOOR = 12


class DatabaseTooOld(Exception):
    """The database (SQLite library or PostgreSQL server) predates what the service needs."""


def _check_sqlite_library() -> None:
    if sqlite3.sqlite_version_info < SQLITE_FLOOR:
        floor = ".".join(map(str, SQLITE_FLOOR))
        raise DatabaseTooOld(
            f"SQLite {sqlite3.sqlite_version} is too old: imagetasks needs {floor} or newer"
            " (Python's sqlite3 module is linked against it)"
        )


def _check_postgres_server(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        version = dbapi_connection.driver_connection.get_server_version()
        if version.major < POSTGRES_FLOOR:
            raise DatabaseTooOld(
                f"PostgreSQL {version.major}.{version.minor} is too old:"
                f" imagetasks needs {POSTGRES_FLOOR} or newer"
            )


class _SQLiteCompiler(SQLiteCompiler):
    """SQLite's compiler, with a table's hint (`Select.with_hint(..., "sqlite")`)
    written after its name: `tasks INDEXED BY ix_...` pins a plan that SQLite's
    planner would otherwise choose by statistics, or by none."""

    def get_from_hint_text(self, table: Any, text: str | None) -> str | None:
        return text


def _prepare_sqlite(engine: AsyncEngine) -> None:
    engine.dialect.statement_compiler = _SQLiteCompiler

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's BEGIN below be the only transaction control.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.info.get(_SINGLE_READ):
            return  # no transaction: the statement runs on its own (`single_read`)
        # IMMEDIATE takes the write lock up front: a deferred transaction that
        # later upgrades can fail with SQLITE_BUSY instead of waiting its turn.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def create_engine(database_url: str, *, echo: bool = False) -> AsyncEngine:
    """An engine for DATABASE_URL; creates the SQLite file's directory."""
    url = make_url(database_url)
    # No pre-ping: it costs a round trip per request. A connection that died
    # with the server fails one statement, which invalidates the whole pool.
    # hide_parameters: a failed statement's error never prints its values (secrets).
    kwargs: dict[str, Any] = {"echo": echo, "hide_parameters": True}
    if url.get_backend_name() == "sqlite":
        _check_sqlite_library()
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, **kwargs)
        _prepare_sqlite(engine)
        return engine
    kwargs.update(pool_size=10, max_overflow=10, pool_recycle=1800)
    engine = create_async_engine(url, **kwargs)
    if engine.dialect.name == "postgresql":
        _check_postgres_server(engine)
    return engine


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


_AUTOCOMMIT = "imagetasks.autocommit"
_SINGLE_READ = "imagetasks.single_read"


@asynccontextmanager
async def statement_commits(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection on which each statement commits on its own (PostgreSQL).

    No BEGIN and COMMIT round trips around statements that stand alone, such
    as a guarded UPDATE; `transaction` opens a real one for those that must
    commit together. SQLite keeps one immediate transaction: its write lock.
    """
    if engine.dialect.name != "postgresql":
        async with engine.begin() as connection:
            yield connection
        return
    async with engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        with _marked(connection, _AUTOCOMMIT):
            yield connection


@contextmanager
def _marked(connection: AsyncConnection, flag: str) -> Iterator[None]:
    """`flag` set in the pooled connection's info while the block runs."""
    connection.info[flag] = True
    try:
        yield
    finally:
        # An invalidated connection (the server dropped it) has no info to clean,
        # and asking for it would raise over the error that invalidated it.
        if not connection.invalidated:
            connection.info.pop(flag, None)


def each_statement_commits(db: AsyncConnection) -> bool:
    """Whether a statement on `db` commits on its own: a `statement_commits`
    connection (PostgreSQL) outside `transaction`."""
    return bool(db.info.get(_AUTOCOMMIT))


@asynccontextmanager
async def single_read(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection for a read that is one statement, run outside any transaction.

    One statement reads one snapshot on both databases, so it needs none: this
    saves the BEGIN and COMMIT round trips, and on SQLite the write lock that an
    immediate transaction would take (a read then never waits for a writer).
    Nothing written on it would commit together with anything else.
    """
    if engine.dialect.name == "postgresql":
        async with statement_commits(engine) as connection:
            yield connection
        return
    async with engine.connect() as connection:
        with _marked(connection, _SINGLE_READ):
            yield connection


@asynccontextmanager
async def transaction(db: AsyncConnection) -> AsyncIterator[AsyncConnection]:
    """Statements that commit together: a transaction of their own on a
    `statement_commits` connection, else the transaction `db` is already in."""
    if not each_statement_commits(db):
        yield db
        return
    await db.commit()  # ends the autocommitted statements' logical transaction: no round trip
    await db.execution_options(isolation_level=db.dialect.default_isolation_level)
    db.info[_AUTOCOMMIT] = False  # until it ends: a `transaction` inside joins this one
    try:
        async with db.begin():
            yield db
    finally:
        if not db.invalidated:
            db.info[_AUTOCOMMIT] = True
        await db.execution_options(isolation_level="AUTOCOMMIT")
