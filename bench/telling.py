"""The figures about telling callers: wait latency, webhook fan-out, and callback
ingest with a subscriber (parts `waiting`, `fanout` and `subscribed`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import fanout, waiting
from bench.databases import fresh_database

PARTS = ("waiting", "fanout", "subscribed")


def run(
    parts: set[str],
    kinds: list[str],
    quick: bool,
    workdir: Path,
    simulator_url: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Each requested part on each database kind; results by part."""
    results: dict[str, Any] = {}
    if "waiting" in parts:
        results["waiting"] = []
        for kind in kinds:
            with fresh_database(kind, workdir, "waiting") as database:
                log(f"waiting/{kind}")
                samples = 40 if quick else 200
                results["waiting"].append(
                    waiting.measure(database, simulator_url, workdir, samples)
                )
    if "fanout" in parts:
        results["fanout"] = []
        for kind in kinds:
            with fresh_database(kind, workdir, "fanout") as database:
                log(f"fanout/{kind}")
                events, seconds = (400, 3.0) if quick else (2000, 5.0)
                results["fanout"].append(
                    fanout.measure(database, simulator_url, workdir, events, seconds)
                )
    if "subscribed" in parts:
        seconds, pairs, pool = (2.0, 2, 12_000) if quick else (5.0, 3, 30_000)
        results["subscribed"] = []
        for kind in kinds:
            with fresh_database(kind, workdir, "subscribed") as database:
                log(f"subscribed/{kind}: ingest with the endpoint off and on in turns")
                results["subscribed"].append(
                    fanout.measure_ingest(database, simulator_url, workdir, seconds, pairs, pool)
                )
    return results
