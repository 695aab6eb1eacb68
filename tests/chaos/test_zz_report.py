"""Last of the suite (modules run in name order): the log audit of the whole run, and
the figures for docs/reliability.md. Run on its own, the audit starts a cluster of
its own and drives it through the paths that handle secrets, so it never has
nothing to check."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from app.callback_urls import sign
from tests.chaos.cluster import leaks
from tests.chaos.conftest import ClusterPool, Figures, LogAudit
from tests.e2e.pool import Databases
from tests.e2e.stack import Process


def test_the_log_audit_finds_a_planted_secret(tmp_path: Path) -> None:
    """The audit itself works: a token inside a longer hex run and a plain secret are found."""
    token = sign("tsk_planted", "planted-secret-0123456789")
    api_token = "planted-api-token-" + secrets.token_hex(8)
    process = Process("planted", [], {}, tmp_path)
    process.stdout_path.write_text(f'{{"path": "/x/{"ab" * 7}{token}cd"}}\nclean line\n')
    process.stderr_path.write_text(f"Authorization: Bearer {api_token}\n")
    found = leaks([process], {"the token": token, "the API token": api_token, "absent": "zz" * 20})
    assert found == ["planted: the API token", "planted: the token"]


async def exercise_a_cluster(pool: ClusterPool) -> None:
    """One cluster through the secret-handling paths: submit, callbacks good and bad, image."""
    cluster = await pool.start("sqlite", replicas=1)
    task = await cluster.submit("a lighthouse, for the log audit")
    await cluster.wait_image(task["id"], timeout=90)
    refused = await cluster.post_callback(task["id"], {"status": "completed"}, token="0" * 32)
    assert refused.status_code == 404
    body = {"code": 200, "data": {"id": task["upstream_task_id"], "status": "completed"}}
    duplicate = await cluster.post_callback(task["id"], body)
    assert duplicate.status_code < 500, duplicate.text


@pytest.mark.asyncio(loop_scope="session")
async def test_no_secret_in_any_log_line_of_the_suite(
    log_audit: LogAudit, figures: Figures, chaos_databases: Databases, tmp_path: Path
) -> None:
    """Every line every process of this run wrote is free of tokens, secrets and keys."""
    if not log_audit.entries:
        # Run alone: make the lines to audit rather than pass on none.
        pool = ClusterPool(chaos_databases, tmp_path, log_audit)
        try:
            await exercise_a_cluster(pool)
        finally:
            await pool.close()
    assert log_audit.lines() > 0
    found = log_audit.all_leaks()
    figures.record(
        "log_audit",
        clusters=len(log_audit.entries),
        processes=sum(len(procs) for procs, _ in log_audit.entries),
        lines=log_audit.lines(),
        secrets_searched=log_audit.secret_count(),
        leaks=len(found),
    )
    print(f"\n[chaos figures] written to {figures.path}")
    assert found == []
