"""Property-based request generation against a running service (schemathesis and
hypothesis), run in a worker thread because both drive a synchronous client."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from app.logging import redact_text

Case = schemathesis.Case[Any]
Prepare = Callable[[Case], None]


@dataclass
class FuzzRun:
    """What one batch of generated requests got back."""

    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_route: Counter[str] = field(default_factory=Counter)
    route_statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    bad_error_bodies: list[str] = field(default_factory=list)
    accepted_writes: list[str] = field(default_factory=list)

    def describe(self, case: Case, status: int) -> str:
        """One line naming the request (tokens redacted)."""
        return redact_text(f"{status} {case.method} {case.formatted_path} query={case.query}")


def _error_shaped(response: Any) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and isinstance(error.get("code"), str) and "message" in error


def fuzz_schema(
    schema: Any,
    base_url: str,
    *,
    mode: schemathesis.GenerationMode,
    examples: int,
    prepare: Prepare,
    allowed_5xx: Callable[[Case, int], bool],
    path_parameters: dict[str, Any] | None = None,
) -> FuzzRun:
    """Send ``examples`` generated requests over every operation; record what came back."""
    run = FuzzRun()
    session = requests.Session()
    session.trust_env = False
    strategy = schema.as_strategy(generation_mode=mode)
    if path_parameters:
        known = schema.as_strategy(generation_mode=mode, path_parameters=path_parameters)
        strategy = st.one_of(strategy, known)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def send(case: Case) -> None:
        prepare(case)
        response = case.call(base_url=base_url, session=session, timeout=30)
        status = response.status_code
        run.cases += 1
        run.statuses[status] += 1
        run.by_route[f"{case.method} {case.path}"] += 1
        run.route_statuses[(f"{case.method} {case.path}", status)] += 1
        if status >= 500 and not allowed_5xx(case, status):
            run.server_errors.append(run.describe(case, status))
        if status >= 400 and not _error_shaped(response):
            run.bad_error_bodies.append(run.describe(case, status))
        if 200 <= status < 300 and case.method.upper() != "GET":
            body = "" if not isinstance(case.body, dict | list | str) else json.dumps(case.body)
            headers = {
                k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"
            }
            run.accepted_writes.append(
                f"{run.describe(case, status)} headers={headers} {body[:300]}"
            )

    try:
        send()
    finally:
        session.close()
    return run


def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    """Any JSON value, nested a little."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=30),
        st.sampled_from(
            ["completed", "processing", "pending", "failed", "cancelled", "submitting"]
        ),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(
                st.sampled_from(["status", "data", "code", "id", "result", "progress", "x"])
                | st.text(max_size=8),
                children,
                max_size=5,
            ),
        ),
        max_leaves=max_leaves,
    )


def fuzz_bodies(
    strategy: st.SearchStrategy[Any], examples: int, send: Callable[[Any], None]
) -> None:
    """Feed ``examples`` values of ``strategy`` to ``send``."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(value=strategy)
    def run(value: Any) -> None:
        send(value)

    run()
