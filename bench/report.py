"""docs/performance.md from a results dict: machine, figures against targets, plans."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import telling_report

NOTES = Path(__file__).with_name("performance_notes.md")


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return f"{value}{unit}"


def _met(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "**no**")


def _machine(m: dict[str, Any]) -> list[str]:
    tools = ", ".join(f"{k}: {v}" for k, v in m["tools"].items() if v)
    packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
    return [
        "| | |",
        "| --- | --- |",
        f"| CPU | {m['cpu']}, {m['cores']} cores |",
        f"| memory | {m['memory_gib']} GiB |",
        f"| OS | {m['os']} (kernel {m['kernel']}) |",
        f"| Python | {m['python']} |",
        f"| PostgreSQL | {m['postgresql'] or 'not reachable'} |",
        f"| SQLite | {m['sqlite']} |",
        f"| packages | {packages} |",
        f"| tools | {tools} |",
        f"| load average at start | {', '.join(str(v) for v in m['load_average_at_start'])} |",
        f"| commit | {m['git_commit']} |",
    ]


def ingest_target(run: dict[str, Any]) -> float:
    """The saturated ratio each configuration must reach (issue goals)."""
    if run["database"] == "sqlite" or run.get("deployment") == "single process":
        return 0.25
    return 0.5 if run["confirm_callbacks"] else 0.6


def _paused(alone: dict[str, Any] | None, target: float) -> str:
    if not alone:
        return "-"
    met = _met(alone["ratio"] is not None and alone["ratio"] >= target)
    rates = f"{_fmt(alone['webhook_rps'])} / {_fmt(alone['baseline_rps'])} req/s"
    return f"{_fmt(alone['ratio'])} {met} ({rates})"


def _paused_half(alone: dict[str, Any] | None) -> str:
    point = (alone or {}).get("half_rate")
    if not point:
        return "-"
    latency = point["webhook"]["latency"]
    met = _met(latency["p99_ms"] is not None and latency["p99_ms"] <= 20)
    return f"{_fmt(point['rate'])}/s: {_fmt(latency['p50_ms'])} / {_fmt(latency['p99_ms'])} {met}"


def _ingest(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| database | deployment | confirm | webhook req/s | baseline req/s | ratio (target) "
        "| half-rate | webhook p50 / p99 ms | baseline p50 / p99 ms | p99 ≤ 20 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        sat = run["saturation"]
        half = run["half_rate"]
        hook = half["webhook"]["latency"]
        base = half["baseline"]["latency"]
        target = ingest_target(run)
        ratio_ok = sat["ratio"] is not None and sat["ratio"] >= target
        p99_ok = hook["p99_ms"] is not None and hook["p99_ms"] <= 20
        lines.append(
            f"| {run['database']} | {run.get('deployment', '-')} "
            f"| {'on' if run['confirm_callbacks'] else 'off'} "
            f"| {_fmt(sat['webhook_rps'])} | {_fmt(sat['baseline_rps'])} "
            f"| {_fmt(sat['ratio'])} (≥ {target}) {_met(ratio_ok)} | {_fmt(half['rate'])}/s "
            f"| {_fmt(hook['p50_ms'])} / {_fmt(hook['p99_ms'])} "
            f"| {_fmt(base['p50_ms'])} / {_fmt(base['p99_ms'])} | {_met(p99_ok)} |"
        )
    lines += [
        "",
        "CPU per request in the same saturated runs (work deferred past a run included):",
        "the API process alone, which is what one API replica spends, and beside it the",
        "worker's share (confirmations and the downloads they queue). The CPU ratio is",
        "the saturated ratio an API replica reaches when it has a core to itself. With",
        "the worker paused is one more pair of runs, the worker stopped for the webhook's",
        "(it catches up after): the API replica alone on the two cores, as when the",
        "worker runs elsewhere; and at half that replica's own saturated rate, its",
        "webhook p50 / p99 with the worker paused likewise:",
        "",
        "| database | deployment | confirm | API CPU ms: webhook / no-op | CPU ratio (target) "
        "| worker CPU ms per webhook request | ratio with the worker paused "
        "| half rate with the worker paused: p50 / p99 ms (p99 ≤ 20 ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        cpu = run["saturation"].get("api_cpu_ms")
        if not cpu:
            continue
        target = ingest_target(run)
        cpu_ratio = run["saturation"]["cpu_ratio"]
        met = _met(cpu_ratio is not None and cpu_ratio >= target)
        split = run.get("deployment") == "api+worker"
        lines.append(
            f"| {run['database']} | {run.get('deployment', '-')} "
            f"| {'on' if run['confirm_callbacks'] else 'off'} "
            f"| {_fmt(cpu['webhook'])} / {_fmt(cpu['baseline'])} "
            f"| {_fmt(cpu_ratio)} (≥ {target}) {met} "
            f"| {_fmt(cpu['worker_per_webhook']) if split else '-'} "
            f"| {_paused(run['saturation'].get('worker_paused'), target)} "
            f"| {_paused_half(run['saturation'].get('worker_paused'))} |"
        )
    confirmed = [run for run in runs if run.get("confirmation")]
    if confirmed:
        lines += [
            "",
            "Confirmations during the half-rate run (callback → confirmed is the first",
            "delivery's receipt to the task's recorded completion; the backlog is the count",
            "of due confirmations, sampled each second):",
            "",
            "| database | deployment | callback → confirmed p50 / p99 ms (p99 ≤ 2000) "
            "| unconfirmed | backlog first / last third mean, max | grows |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for run in confirmed:
            c = run["confirmation"]
            latency = c["callback_to_confirmed"]
            p99_ok = latency["p99_ms"] is not None and latency["p99_ms"] <= 2000
            first, last = c["backlog_first_third_mean"], c["backlog_last_third_mean"]
            grows = None if first is None else last > max(2 * first, first + 20)
            lines.append(
                f"| {run['database']} | {run.get('deployment', '-')} "
                f"| {_fmt(latency['p50_ms'])} / {_fmt(latency['p99_ms'])} {_met(p99_ok)} "
                f"| {c['unconfirmed']} | {_fmt(first)} / {_fmt(last)}, {c['backlog_max']} "
                f"| {'-' if grows is None else ('**yes**' if grows else 'no')} |"
            )
    lines.append("")
    lines.append("Deliveries recorded by the service in each run (new ones are `confirming` or")
    lines.append("`applied`, repeats `duplicate`), and provider queries made to confirm them:")
    lines.append("")
    for run in runs:
        confirm = "on" if run["confirm_callbacks"] else "off"
        lines.append(
            f"- {run['database']}, {run.get('deployment', '-')}, confirm {confirm}: "
            f"{run['deliveries_by_outcome']}, "
            f"{run['confirmation_queries']} confirmation queries"
            + (
                " (task pool wrapped: late runs were all duplicates)"
                if run["pool_exhausted"]
                else ""
            )
        )
    return lines


def _downloads(d: dict[str, Any]) -> list[str]:
    lines = [
        f"Baseline: `{d.get('baseline', 'curl -o /dev/null')}` on the disk the worker stores to.",
        "",
        "The worker's figure is the job the goal names (fetch, hash, write, fsync, record); "
        "the WebP variants it renders after the record, outside the job's lease, are timed "
        "apart; peak memory covers both.",
        "",
        "| case | worker MB/s | curl MB/s | ratio (target) | fetch only MB/s (ratio) "
        "| then variants ms | peak RSS growth (target ≤ 16 MB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in d["sizes"].items():
        target = 0.95 if s.get("link_bytes_per_s") else 0.8
        lines.append(
            f"| {name} | {_fmt(s['worker_mb_s'])} | {_fmt(s['curl_mb_s'])} "
            f"| {_fmt(s['ratio'])} (≥ {target}) "
            f"{_met(s['ratio'] is not None and s['ratio'] >= target)} "
            f"| {_fmt(s['fetch_only_mb_s'])} ({_fmt(s['fetch_only_ratio'])}) "
            f"| {_fmt(s.get('variants_ms'))} "
            f"| {_fmt(s['peak_rss_growth_mb'], ' MB')} {_met(s['peak_rss_growth_mb'] <= 16)} |"
        )
    return lines


def _wake(w: dict[str, Any]) -> list[str]:
    s = w["completion_to_stored"]
    return [
        f"{w['database']}, {w['deployment']}: {w['completions_per_s']} completions/s, "
        f"a {w['image_bytes'] / 1e6:.0f} MB image each; stored_at minus completed_at over "
        f"{s['n']} images ({w['not_stored']} not stored within the run):",
        "",
        "| p50 ms | p90 ms | p99 ms | max ms |",
        "| --- | --- | --- | --- |",
        f"| {_fmt(s['p50_ms'])} | {_fmt(s['p90_ms'])} | {_fmt(s['p99_ms'])} "
        f"| {_fmt(s['max_ms'])} |",
    ]


def _listing(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| database | page | p50 ms (target ≤ 10) | p99 ms | baseline p50 / p99 ms "
        "| p50 ÷ baseline |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        base = run["latency"]["baseline"]
        for page in ("first_page", "deep_page"):
            s = run["latency"][page]
            label = "first" if page == "first_page" else f"page {run['deep_page']} (cursor)"
            lines.append(
                f"| {run['database']} | {label} | {_fmt(s['p50_ms'])} {_met(s['p50_ms'] <= 10)} "
                f"| {_fmt(s['p99_ms'])} | {_fmt(base['p50_ms'])} / {_fmt(base['p99_ms'])} "
                f"| {_fmt(s['p50_vs_baseline'])} |"
            )
        overview = run["latency"].get("console_overview")
        if overview:
            lines.append(
                f"| {run['database']} | console overview (target ≤ 300) "
                f"| {_fmt(overview['p50_ms'])} {_met(overview['p50_ms'] <= 300)} "
                f"| {_fmt(overview['p99_ms'])} | {_fmt(base['p50_ms'])} / {_fmt(base['p99_ms'])} "
                f"| {_fmt(overview['p50_vs_baseline'])} |"
            )
    return lines


def _submit(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| database | POST /tasks p50 / p99 ms | simulator submit p50 / p99 ms "
        "| overhead p50 ms (target ≤ 3) | paired overhead p50 / p99 ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        s, d, paired = run["service"], run["simulator_direct"], run["paired_overhead"]
        lines.append(
            f"| {run['database']} | {_fmt(s['p50_ms'])} / {_fmt(s['p99_ms'])} "
            f"| {_fmt(d['p50_ms'])} / {_fmt(d['p99_ms'])} "
            f"| {_fmt(run['overhead_p50_ms'])} {_met(run['overhead_p50_ms'] <= 3)} "
            f"| {_fmt(paired['p50_ms'])} / {_fmt(paired['p99_ms'])} |"
        )
    return lines


def _plans(runs: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for run in runs:
        for page, plan in run["plans"].items():
            lines += [f"{run['database']}, {page.replace('_', ' ')}:", "", "```", plan, "```", ""]
    return lines


def _command(results: dict[str, Any]) -> str:
    if not results.get("quick"):
        return "`make bench`"
    runs = results.get("runs")
    if runs:  # parts from separate runs, one after the other
        return "`python -m bench --quick` (" + "; ".join(f"{k}: {v}" for k, v in runs.items()) + ")"
    return "`python -m bench --quick`"


def render(results: dict[str, Any], json_name: str) -> str:
    """The whole docs/performance.md."""
    out = [
        "# Performance",
        "",
        f"Generated by {_command(results)} ({results['duration_s']:.0f} s) at "
        f"{results['started_at']}; raw figures in `bench/results/{json_name}`. "
        "The machine is shared, so every figure",
        "stands next to a baseline taken in the same run; compare ratios, not absolute times.",
        "",
        "## Machine",
        "",
        *_machine(results["machine"]),
        "",
    ]
    if results.get("ingest"):
        out += ["## 1. Callback ingest", "", *_ingest(results["ingest"]), ""]
        out += [
            "## 5. Callback latency against offered rate",
            "",
            "![callback latency](../bench/results/callback_latency.png)",
            "",
        ]
    if results.get("downloads"):
        out += ["## 2. Downloads", "", *_downloads(results["downloads"]), ""]
    if results.get("wake"):
        out += ["## 7. Completion to stored image", "", *_wake(results["wake"]), ""]
    if results.get("listing"):
        out += [
            "## 3. Listing",
            "",
            *_listing(results["listing"]),
            "",
            "### Query plans (the SQL `repository.list_tasks` sends)",
            "",
            *_plans(results["listing"]),
        ]
    if results.get("submit"):
        out += ["## 4. Submission overhead", "", *_submit(results["submit"]), ""]
    out += telling_report.lines(results)
    if NOTES.exists():
        out += [NOTES.read_text().rstrip(), ""]
    return "\n".join(out)
