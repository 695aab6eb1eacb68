"""`make bench`: run every part, write bench/results/ and docs/performance.md.

python -m bench [--quick]
    [--only ingest,downloads,wake,listing,submit,waiting,fanout,subscribed]
    [--no-postgres] [--no-sqlite] [--ingest-case noconfirm-split,...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import (
    downloads,
    ingest,
    listing,
    machine,
    plot,
    report,
    saturate,
    submit,
    telling,
    wake,
)
from bench.databases import fresh_database, postgres_available
from bench.stack import start_service, start_simulator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "performance.md"
PARTS = ("ingest", "downloads", "wake", "listing", "submit", *telling.PARTS)
# Ingest configurations per database: (confirm, deployment, sweep). PostgreSQL is
# measured as the README deploys it to production; SQLite is one process.
INGEST = {
    "postgres": [
        (True, ingest.SPLIT, True),
        (False, ingest.SPLIT, False),
        (True, ingest.SINGLE, False),
    ],
    "sqlite": [(True, ingest.SINGLE, False), (False, ingest.SINGLE, False)],
}


def _case(confirm: bool, deployment: str) -> str:
    """An ingest configuration's name for `--ingest-case`: confirm-split, noconfirm-single..."""
    return f"{'' if confirm else 'no'}confirm-{'split' if deployment == ingest.SPLIT else 'single'}"


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(
    parts: set[str], kinds: list[str], quick: bool, workdir: Path, cases: set[str] | None = None
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    simulator, simulator_url = start_simulator(workdir)
    try:
        if "ingest" in parts:
            plan = ingest.IngestPlan()
            if quick:
                plan = ingest.IngestPlan(warmup=1, saturation=3, pairs=2, half_rate=10, sweep=2)
            results["ingest"] = []
            for kind in kinds:
                with fresh_database(kind, workdir, "ingest") as database:
                    pool = ingest.CallbackPool(plan.pool, simulator_url)
                    _log(f"ingest/{kind}: seeding {plan.pool} tasks")
                    ingest.seed(database, pool)
                    for confirm, deployment, sweep in INGEST[kind]:
                        if cases is not None and _case(confirm, deployment) not in cases:
                            continue
                        _log(f"ingest/{kind}: {deployment}, CONFIRM_CALLBACKS={confirm}")
                        results["ingest"].append(
                            ingest.measure(
                                database,
                                pool,
                                simulator_url,
                                workdir,
                                plan,
                                confirm=confirm,
                                sweep=sweep,
                                deployment=deployment,
                            )
                        )
        if "downloads" in parts:
            _log("downloads: 20 MB and 50 MB")
            url = downloads.migrate_sqlite(workdir / "downloads.db")
            results["downloads"] = downloads.measure(workdir, url, repeats=2 if quick else 3)
        if "wake" in parts and "postgres" in kinds:
            # Across processes: the worker hears the API's commits through LISTEN/NOTIFY.
            with fresh_database("postgres", workdir, "wake") as database:
                _log("wake/postgres: completion to stored image, 1 MB")
                results["wake"] = wake.measure(
                    database, simulator_url, workdir, 10 if quick else 30
                )
        if "listing" in parts:
            results["listing"] = []
            for kind in kinds:
                with fresh_database(kind, workdir, "listing") as database:
                    _log(f"listing/{kind}: seeding {listing.TASKS} tasks")
                    seeded = listing.seed(database)
                    service = start_service(workdir, f"listing-{kind}", database.url, simulator_url)
                    try:
                        result = listing.measure(service, database, 100 if quick else 300)
                    finally:
                        service.child.stop()
                    results["listing"].append({**result, "seeded": seeded})
        if "submit" in parts:
            results["submit"] = []
            for kind in kinds:
                with fresh_database(kind, workdir, "submit") as database:
                    _log(f"submit/{kind}")
                    service = start_service(workdir, f"submit-{kind}", database.url, simulator_url)
                    try:
                        results["submit"].append(
                            submit.measure(service, simulator_url, kind, 100 if quick else 200)
                        )
                    finally:
                        service.child.stop()
        results.update(telling.run(parts, kinds, quick, workdir, simulator_url, _log))
    finally:
        simulator.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short phases, for trying it out")
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument(
        "--ingest-case", help="comma-separated ingest configurations only (noconfirm-split...)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    parts = {part.strip() for part in args.only.split(",") if part.strip()}
    if unknown := parts - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    kinds = [] if args.no_sqlite else ["sqlite"]
    if not args.no_postgres:
        problem = postgres_available()
        if problem:
            _log(f"PostgreSQL skipped: {problem}")
        else:
            kinds.append("postgres")
    if saturate.wrk_path() is None:
        _log("wrk not found (apt-get install wrk): saturation measured by the Python generator")
    tools = {
        "saturation": saturate.tool_name(),
        "wrk": saturate.wrk_version(),
        "fixed_rate": "bench/loadgen.py (open loop, asyncio + uvloop)",
        "curl": downloads.curl_version(),
    }
    started = time.time()
    started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    description = machine.describe(tools)
    workdir = Path(tempfile.mkdtemp(prefix="imagetasks-bench-"))
    _log(f"scratch directory {workdir}")
    try:
        cases = set(args.ingest_case.split(",")) if args.ingest_case else None
        results = run(parts, kinds, args.quick, workdir, cases)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results = {
        "started_at": started_at,
        "duration_s": round(time.time() - started, 1),
        "quick": args.quick,
        "machine": description,
        **results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = started_at.replace(":", "").replace("-", "")
    text = json.dumps(results, indent=2, default=str) + "\n"
    (RESULTS / f"{stamp}.json").write_text(text)
    (RESULTS / "latest.json").write_text(text)
    if results.get("ingest"):
        plot.callback_latency(results["ingest"], RESULTS / "callback_latency.png")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(report.render(results, "latest.json"))
    _log(
        f"done in {results['duration_s']:.0f} s: {DOC.relative_to(ROOT)}, bench/results/latest.json"
    )


if __name__ == "__main__":
    main()
