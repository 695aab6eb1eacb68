"""5. The plot: callback latency against offered rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

P99_TARGET_MS = 20


def callback_latency(ingest: list[dict[str, Any]], path: Path) -> None:
    """p50 and p99 of the webhook against the offered rate, one line pair per database."""
    figure, axis = plt.subplots(figsize=(8, 5), dpi=110)
    colours = {"sqlite": "tab:blue", "postgres": "tab:orange"}
    for run in ingest:
        if not run["confirm_callbacks"] or len(run["sweep"]) < 2:
            continue
        colour = colours.get(run["database"], "tab:gray")
        points = [p for p in run["sweep"] if p["latency"]["n"]]
        rates = [p["offered_rps"] for p in points]
        label = run["database"]
        axis.plot(
            rates,
            [p["latency"]["p50_ms"] for p in points],
            "o--",
            color=colour,
            label=f"{label} p50",
        )
        axis.plot(
            rates,
            [p["latency"]["p99_ms"] for p in points],
            "s-",
            color=colour,
            label=f"{label} p99",
        )
        axis.axvline(run["saturation"]["webhook_rps"], color=colour, alpha=0.3, linestyle=":")
    axis.axhline(P99_TARGET_MS, color="red", alpha=0.5, linestyle="-.", label="p99 target (20 ms)")
    axis.set_yscale("log")
    axis.set_xlabel("offered rate (callbacks/s, open loop); dotted: saturated throughput (wrk)")
    axis.set_ylabel("latency from scheduled send (ms, log scale)")
    axis.set_title("Webhook latency against offered rate (CONFIRM_CALLBACKS=true)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
