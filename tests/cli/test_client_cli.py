"""The client commands as a user runs them: subprocesses against a sandbox process."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.ports import free_port

from .helpers import Result, Sandbox, clean_env, run_cli


@pytest.fixture(scope="module")
def waited(sandbox: Sandbox) -> Result:
    """One `submit --wait` run to its end, shared by the tests that need a stored image."""
    return sandbox.run("submit", "a lighthouse at dawn", "--wait", "--metadata", "case=cli")


def test_submit_wait_stores_the_image(sandbox: Sandbox, waited: Result) -> None:
    """`submit --wait` ends with the image stored and prints the sha256 the API records."""
    assert waited.code == 0, waited.stderr
    task = sandbox.api(f"/tasks/{waited.field('task')}").json()
    assert task["image"]["status"] == "stored"
    assert task["metadata"] == {"case": "cli"}
    assert waited.field("sha256") == task["image"]["sha256"]
    width, height = task["image"]["width"], task["image"]["height"]
    assert waited.field("dimensions") == f"{width}x{height}"


def test_submit_without_wait_prints_only_the_id(sandbox: Sandbox) -> None:
    """Without --wait, stdout is just the task id, for scripts."""
    result = sandbox.run("submit", "a quiet harbour")
    assert result.code == 0, result.stderr
    assert sandbox.api(f"/tasks/{result.stdout.strip()}").status_code == 200


def test_image_writes_exactly_the_stored_bytes(
    sandbox: Sandbox, waited: Result, tmp_path: Path
) -> None:
    """`image ID -o FILE` writes the bytes the API serves, matching the task's sha256."""
    task_id, target = waited.field("task"), tmp_path / "out.png"
    result = sandbox.run("image", task_id, "-o", str(target))
    assert result.code == 0, result.stderr
    served = sandbox.api(f"/tasks/{task_id}/image").content
    assert target.read_bytes() == served
    assert hashlib.sha256(served).hexdigest() == waited.field("sha256")


def test_list_json_contains_the_task(sandbox: Sandbox, waited: Result) -> None:
    """`list --json` prints parseable JSON holding the task."""
    result = sandbox.run("list", "--json", "--image-status", "stored")
    assert result.code == 0, result.stderr
    ids = [task["id"] for task in json.loads(result.stdout)["items"]]
    assert waited.field("task") in ids


def test_show_unknown_task_exits_1(sandbox: Sandbox) -> None:
    """A task that does not exist is reported and exits 1."""
    result = sandbox.run("show", "tsk_does_not_exist")
    assert result.code == 1
    assert "does not exist" in result.stderr


def test_bad_token_exits_3(sandbox: Sandbox) -> None:
    """A refused token exits 3 and says how to set one."""
    result = sandbox.run("list", token="not-the-token")
    assert result.code == 3
    assert "the service refused the token (set IMAGETASKS_TOKEN or --token)" in result.stderr


def test_invalid_size_exits_2_naming_the_field(sandbox: Sandbox) -> None:
    """An invalid --size exits 2 and prints the field and the reason."""
    result = sandbox.run("submit", "a bad size", "--size", "7x7")
    assert result.code == 2
    assert "size: must be 1:1, 2:3, 3:2, 1024x1024, 1024x1536 or 1536x1024" in result.stderr


def test_unreachable_service_exits_4(tmp_path: Path) -> None:
    """A URL where nothing listens exits 4 with a clear message."""
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli("list", "--url", url, "--token", "x", env=clean_env(), cwd=tmp_path)
    assert result.code == 4
    assert f"cannot reach imagetasks at {url}" in result.stderr


@pytest.mark.parametrize("terminal", ["0", "1"])
def test_list_never_shortens_ids_in_80_columns(sandbox: Sandbox, terminal: str) -> None:
    """Piped or on an 80-column terminal, every id is whole and works with `show`."""
    long_prompt = "a very long prompt about a lighthouse at dawn " * 4
    submitted = sandbox.run("submit", long_prompt)
    assert submitted.code == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    env = clean_env(
        IMAGETASKS_URL=sandbox.url,
        IMAGETASKS_TOKEN=sandbox.token,
        COLUMNS="80",
        TTY_COMPATIBLE=terminal,
    )
    listed = run_cli("list", "--limit", "200", env=env, cwd=sandbox.directory)
    assert listed.code == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:] if line.strip()}
    assert task_id in rows
    if terminal == "1":
        assert all(len(line) <= 80 for line in listed.stdout.splitlines())
        assert rows[task_id].endswith("…")
    else:
        assert rows[task_id].endswith(long_prompt.strip())
    assert sandbox.run("show", task_id).field("task") == task_id


@pytest.mark.parametrize("terminal", ["0", "1"])
def test_the_next_cursor_is_printed_whole_on_one_line(sandbox: Sandbox, terminal: str) -> None:
    """The `more: --cursor …` hint is copied into the next call: it is never wrapped."""
    for _ in range(2):
        assert sandbox.run("submit", "a lighthouse").code == 0
    env = clean_env(
        IMAGETASKS_URL=sandbox.url,
        IMAGETASKS_TOKEN=sandbox.token,
        COLUMNS="40",
        TTY_COMPATIBLE=terminal,
    )
    listed = run_cli("list", "--limit", "1", env=env, cwd=sandbox.directory)
    assert listed.code == 0, listed.stderr
    (hint,) = [line for line in listed.stderr.splitlines() if line.strip()]
    cursor = sandbox.api("/tasks?limit=1").json()["next_cursor"]
    assert hint == f"more: --cursor {cursor}"


def test_control_characters_in_a_prompt_cannot_forge_output(sandbox: Sandbox) -> None:
    """A prompt's newlines and escape sequences are shown escaped, never sent to the terminal."""
    prompt = "one\nstatus     completed\x1b[2J\x1b]0;owned\x07"
    submitted = sandbox.run("submit", prompt)
    assert submitted.code == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    for args in (("show", task_id), ("list", "--limit", "200")):
        result = sandbox.run(*args)
        assert result.code == 0, result.stderr
        assert "\x1b" not in result.stdout
        assert "\x07" not in result.stdout
        if args[0] == "show":
            statuses = [line for line in result.stdout.splitlines() if line.startswith("status")]
            assert len(statuses) == 1, result.stdout
            assert result.field("prompt") == "one\\nstatus     completed\\x1b[2J\\x1b]0;owned\\x07"


def test_a_wide_character_prompt_fits_the_terminal_too(sandbox: Sandbox) -> None:
    """CJK and emoji take two columns each: the cut prompt still fits 80 columns."""
    from rich.cells import cell_len

    assert sandbox.run("submit", "灯台の夜明け、水彩画 🎨" * 8).code == 0
    env = clean_env(
        IMAGETASKS_URL=sandbox.url,
        IMAGETASKS_TOKEN=sandbox.token,
        COLUMNS="80",
        TTY_COMPATIBLE="1",
    )
    listed = run_cli("list", "--limit", "5", env=env, cwd=sandbox.directory)
    assert listed.code == 0, listed.stderr
    assert all(cell_len(line) <= 80 for line in listed.stdout.splitlines()), listed.stdout
