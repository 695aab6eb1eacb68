"""Fixtures of the reliability suite: databases, clusters, the log audit and the figures.

Every cluster gets a fresh database (a clone of a migrated PostgreSQL template,
or a copy of the migrated SQLite file). When a test ends, its cluster's secrets
are collected and every line its processes wrote is searched for them; the
suite's last module checks the audit of the whole run and writes the figures.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.chaos.cluster import Cluster, leaks, log_line_count
from tests.e2e.pool import Databases
from tests.e2e.stack import Process


@dataclass
class LogAudit:
    """Every process of the run and the secrets it must never have written."""

    entries: list[tuple[list[Process], dict[str, str]]] = field(default_factory=list)

    def add(self, processes: list[Process], secrets_by_label: dict[str, str]) -> list[str]:
        """Remember one cluster's processes and secrets; its leaks so far."""
        self.entries.append((processes, secrets_by_label))
        return leaks(processes, secrets_by_label)

    def all_leaks(self) -> list[str]:
        """Leaks over the whole run."""
        return sorted({leak for procs, found in self.entries for leak in leaks(procs, found)})

    def lines(self) -> int:
        """Lines written by every process of the run."""
        return sum(log_line_count(procs) for procs, _ in self.entries)

    def secret_count(self) -> int:
        """Distinct secret values searched for."""
        return len({value for _, found in self.entries for value in found.values()})


class Figures:
    """The numbers of this run, for docs/reliability.md."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sections: dict[str, dict[str, Any]] = {}

    def record(self, section: str, **values: Any) -> None:
        """Add or replace one section's figures and write the file again."""
        self.sections[section] = values
        self.path.write_text(json.dumps(self.sections, indent=2, sort_keys=True, default=str))
        print(f"\n[chaos figures] {section}: {json.dumps(values, sort_keys=True, default=str)}")


class ClusterPool:
    """Starts clusters for one test; stops them and audits their logs at the end."""

    def __init__(self, databases: Databases, root: Path, audit: LogAudit) -> None:
        self._databases = databases
        self._root = root
        self._audit = audit
        self.clusters: list[Cluster] = []

    async def start(
        self, kind: str = "postgres", *, replicas: int = 2, **env: str | int | float | bool
    ) -> Cluster:
        """A running cluster on a fresh database of this kind."""
        directory = self._root / f"cluster{len(self.clusters)}"
        directory.mkdir(parents=True)
        database = self._databases.create(kind, directory)
        cluster = Cluster(directory, database, replicas=replicas, **env)
        self.clusters.append(cluster)
        return await cluster.start()

    async def close(self) -> list[str]:
        """Stop every cluster; the secrets found in their output."""
        found: list[str] = []
        for cluster in reversed(self.clusters):
            try:
                secrets_by_label = await cluster.secrets()
            finally:
                await cluster.close()
            found += self._audit.add(cluster.processes(), secrets_by_label)
        return found


@pytest.fixture(scope="session")
def chaos_databases(sqlite_template: Path) -> Iterator[Databases]:
    """The run's database factory; drops what it made at the end."""
    databases = Databases(sqlite_template, label="chaos")
    yield databases
    databases.drop_all()


@pytest.fixture(scope="session")
def log_audit() -> LogAudit:
    """The run's log audit."""
    return LogAudit()


@pytest.fixture(scope="session")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Figures:
    """The run's figures, written to chaos-figures.json under the run's temp dir."""
    return Figures(tmp_path_factory.mktemp("chaos-figures") / "chaos-figures.json")


@pytest_asyncio.fixture(loop_scope="session")
async def clusters(
    chaos_databases: Databases, log_audit: LogAudit, tmp_path: Path
) -> AsyncIterator[ClusterPool]:
    """Clusters for one test; stopped, then their logs searched for secrets."""
    pool = ClusterPool(chaos_databases, tmp_path, log_audit)
    yield pool
    found = await pool.close()
    assert not found, f"secrets in the logs: {found}"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def module_clusters(
    chaos_databases: Databases, log_audit: LogAudit, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ClusterPool]:
    """Clusters shared by a module's tests; stopped and audited when the module ends."""
    pool = ClusterPool(chaos_databases, tmp_path_factory.mktemp("chaos"), log_audit)
    yield pool
    found = await pool.close()
    assert not found, f"secrets in the logs: {found}"
