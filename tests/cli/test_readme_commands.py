"""The README's command lines work from a fresh clone: the virtualenv's path, real commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from .helpers import clean_env, run_cli

ROOT = Path(__file__).resolve().parents[2]
VENV_COMMAND = ".venv/bin/imagetasks"


def readme_command_lines() -> list[str]:
    """Every line of the README's ```sh blocks that runs imagetasks (comments dropped)."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if re.search(r"(^|\s|/)imagetasks\s", line)]


def test_readme_runs_imagetasks_from_the_virtualenv() -> None:
    """`imagetasks` is not on PATH after `make run`: every shown call spells .venv/bin/."""
    lines = readme_command_lines()
    assert lines
    bare = [line for line in lines if not line.startswith(VENV_COMMAND)]
    assert bare == []


def test_readme_commands_exist(tmp_path: Path) -> None:
    """Each command the README runs is one the CLI has (its --help answers)."""
    for command in sorted({shlex.split(line)[1] for line in readme_command_lines()}):
        result = run_cli(command, "--help", env=clean_env(), cwd=tmp_path, timeout=60)
        assert result.code == 0, (command, result.stderr)
