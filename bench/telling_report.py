"""The "Telling callers" section of docs/performance.md: wait latency, webhook fan-out
and callback ingest with a subscriber, each as a ratio to its same-run baseline."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _waiting(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "Settled → waiter answered (`GET /tasks/{id}` with `Prefer: wait=30`, one waiter at a "
        "time; from the settling event's timestamp, taken just before its commit, to the "
        "answer arriving), next to a plain `GET /tasks/{id}` from the same process.",
        "",
        "| database | processes | samples | wait p50 / p99 ms | plain read p50 / p99 ms "
        "| ratio p50 / p99 | unsettled answers |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        wait, read = run["wait_latency"], run["plain_read"]
        where = "2 (settled on one, waited on the other)" if run["processes"] == 2 else "1"
        lines.append(
            f"| {run['database']} | {where} | {run['samples']} "
            f"| {_fmt(wait['p50_ms'])} / {_fmt(wait['p99_ms'])} "
            f"| {_fmt(read['p50_ms'])} / {_fmt(read['p99_ms'])} "
            f"| {_fmt(run['p50_ratio'])} / {_fmt(run['p99_ratio'])} "
            f"| {run['unsettled_answers']} |"
        )
    return lines


def _fanout(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "Events waiting in the outbox, delivered by one process (WEBHOOK_CONCURRENCY "
        "deliveries in flight) to a local receiver that only counts, from its first to its "
        "last arrival; the baseline is the same receiver's rate from a plain httpx client "
        "with as many requests in flight.",
        "",
        "| database | events delivered | events/s | receiver raw req/s | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        lines.append(
            f"| {run['database']} | {run['delivered']} of {run['events']} "
            f"| {_fmt(run['delivered_per_s'])} | {_fmt(run['receiver_raw_rps'])} "
            f"| {_fmt(run['ratio'])} |"
        )
    return lines


def _subscribed(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "Saturated callback ingest (as in section 1, confirmation off) on one process, with "
        "one webhook endpoint subscribed to every task event switched off and on between "
        "alternating runs; each callback then also queues a delivery.",
        "",
        "| database | no subscriber req/s | subscribed req/s | ratio | runs each "
        "| deliveries queued | no-op baseline req/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        plain = ", ".join(_fmt(r["rps"]) for r in run["plain_runs"])
        subscribed = ", ".join(_fmt(r["rps"]) for r in run["subscribed_runs"])
        lines.append(
            f"| {run['database']} | {_fmt(run['plain_rps'])} ({plain}) "
            f"| {_fmt(run['subscribed_rps'])} ({subscribed}) | {_fmt(run['ratio'])} "
            f"| {run['pairs']} x {_fmt(run['seconds'])} s | {run['deliveries_queued']} "
            f"| {_fmt(run['baseline_rps'])} |"
        )
    return lines


def lines(results: dict[str, Any]) -> list[str]:
    """The section, or nothing when none of its parts ran."""
    if not any(results.get(part) for part in ("waiting", "fanout", "subscribed")):
        return []
    out = ["## 6. Telling callers", ""]
    if results.get("quick"):
        out += ["Quick mode (`--quick`): fewer samples and shorter runs.", ""]
    if results.get("waiting"):
        out += ["### Wait latency", "", *_waiting(results["waiting"]), ""]
    if results.get("fanout"):
        out += ["### Webhook fan-out", "", *_fanout(results["fanout"]), ""]
    if results.get("subscribed"):
        out += [
            "### Callback ingest with a subscriber",
            "",
            *_subscribed(results["subscribed"]),
            "",
        ]
    return out
