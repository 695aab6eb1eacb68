"""Confirmations at one offered rate, from a rested worker (PostgreSQL, api+worker).

`python -m bench.fixed_rate --rate 650 --seconds 15`: the API and `imagetasks
worker` as the README deploys them, callbacks with confirmation on at a constant
rate, and then callback → confirmed, the backlog of due confirmations each
second, and the worker's CPU for the run and its drain. Unlike the half-rate
point of `python -m bench`, nothing of an earlier saturated run is still being
downloaded when it starts, and the rate is the one asked for: repeat it to see
how much one run moves.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench import ingest
from bench.databases import fresh_database
from bench.stack import start_service, start_simulator, start_worker

REST_TIMEOUT_SECONDS = 300.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=650.0, help="callbacks a second")
    parser.add_argument("--seconds", type=float, default=15.0, help="how long")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="imagetasks-fixed-rate-"))
    simulator, simulator_url = start_simulator(workdir)
    try:
        with fresh_database("postgres", workdir, "fixed_rate") as database:
            plan = ingest.IngestPlan()
            pool = ingest.CallbackPool(plan.pool, simulator_url)
            ingest.seed(database, pool)
            service = start_service(
                workdir, "fixed-rate", database.url, simulator_url, confirm_callbacks=True
            )
            worker = start_worker(service, "fixed-rate-worker")
            try:
                run = ingest.Runner(service, pool, workdir, "fixed-rate", worker)
                run.open_loop("webhook", 100, 2)  # warm, then let everything rest
                worker.wait_idle(timeout=REST_TIMEOUT_SECONDS)
                since = datetime.now(UTC)
                cpu_before = worker.cpu_seconds()
                with ingest.BacklogSampler(database.url) as sampler:
                    hook = run.open_loop("webhook", args.rate, args.seconds)
                confirmed = ingest.confirmation_figures(database.url, since, sampler.samples)
                worker.wait_idle(timeout=REST_TIMEOUT_SECONDS)
                report = {
                    "rate": args.rate,
                    "seconds": args.seconds,
                    "achieved_rps": hook["achieved_rps"],
                    "webhook_latency": hook["latency"],
                    "callback_to_confirmed": confirmed["callback_to_confirmed"],
                    "unconfirmed": confirmed["unconfirmed"],
                    "backlog_samples": confirmed["backlog_samples"],
                    "worker_cpu_seconds_with_drain": round(worker.cpu_seconds() - cpu_before, 1),
                }
                print(json.dumps(report, indent=2))
            finally:
                worker.stop()
                service.child.stop()
    finally:
        simulator.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
