"""`imagetasks simulator`: the published shape by default, the other shapes on request."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

import app.simulator
from app.cli import cli
from app.simulator import SimulatorConfig


def started(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, SimulatorConfig | None]:
    """Run the command with the server stubbed out; the config it would serve."""
    seen: dict[str, Any] = {}
    monkeypatch.setattr(
        app.simulator, "run_simulator", lambda host, port, config: seen.update(config=config)
    )
    result = CliRunner().invoke(cli, ["simulator", *args])
    return result.exit_code, seen.get("config")


def test_the_published_shape_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    code, config = started(monkeypatch)
    assert code == 0
    assert config is not None
    assert config.body_shape == "published"


@pytest.mark.parametrize("shape", ["envelope", "bare", "published"])
def test_body_shape_picks_the_shape_of_answers_and_callbacks(
    monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    code, config = started(monkeypatch, "--body-shape", shape)
    assert code == 0
    assert config is not None
    assert config.body_shape == shape


def test_an_unknown_body_shape_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    code, config = started(monkeypatch, "--body-shape", "xml")
    assert code == 2
    assert config is None


def test_the_callback_retries_follow_the_providers_policy_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, config = started(monkeypatch)
    assert code == 0
    assert config is not None
    assert config.retry_delays == (1.0, 2.0, 4.0)


@pytest.mark.parametrize(
    ("given", "delays"), [("1,5,30", (1.0, 5.0, 30.0)), ("0.5", (0.5,)), ("", ())]
)
def test_callback_retry_delays_can_be_set(
    monkeypatch: pytest.MonkeyPatch, given: str, delays: tuple[float, ...]
) -> None:
    code, config = started(monkeypatch, "--callback-retry-delays", given)
    assert code == 0
    assert config is not None
    assert config.retry_delays == delays


@pytest.mark.parametrize("given", ["1,soon", "1,-2"])
def test_bad_callback_retry_delays_are_refused(monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    code, config = started(monkeypatch, "--callback-retry-delays", given)
    assert code == 2
    assert config is None
