"""The prompt-directive grammar and the fault object."""

from __future__ import annotations

import pytest

from app.simulator import Fault, FaultError, fault_from_mapping, parse_prompt
from app.simulator.faults import TASK_ERROR_CODES


def test_no_directive_means_no_override() -> None:
    """A plain prompt overrides nothing."""
    assert parse_prompt("a red fox in the snow") == {}


def test_directives_parse_to_typed_values() -> None:
    """Flags, numbers, choices and URLs come out typed."""
    prompt = (
        "fox [sim: dup=3, late_processing ,url=list, image_slow=0.5, redirect_to=http://10.0.0.1/x]"
    )
    assert parse_prompt(prompt) == {
        "dup": 3,
        "late_processing": True,
        "url": "list",
        "image_slow": 0.5,
        "redirect_to": "http://10.0.0.1/x",
    }


def test_later_tokens_win() -> None:
    """Several tokens merge left to right."""
    assert parse_prompt("[sim:dup=2,drop] and [sim:dup=4,drop=false]") == {"dup": 4, "drop": False}


def test_bare_oversize_means_stream() -> None:
    """``oversize`` alone streams; ``oversize=header`` lies in the header."""
    assert parse_prompt("[sim:oversize]") == {"oversize": "stream"}
    assert parse_prompt("[sim:oversize=header]") == {"oversize": "header"}


@pytest.mark.parametrize(
    "prompt",
    [
        "[sim:dupe=2]",
        "[sim:dup=0]",
        "[sim:dup=x]",
        "[sim:outcome=lost]",
        "[sim:redirect_to=ftp://x]",
    ],
)
def test_bad_directives_are_refused(prompt: str) -> None:
    """Unknown names and bad values raise, naming the directive."""
    with pytest.raises(FaultError):
        parse_prompt(prompt)


def test_prompt_overrides_defaults() -> None:
    """Prompt directives apply on top of the global defaults."""
    base = Fault(drop=True, dup=2)
    assert base.with_prompt("[sim:drop=false]") == Fault(drop=False, dup=2)


def test_mapping_uses_directive_names() -> None:
    """The control route's JSON object takes the same names; null keeps the default."""
    assert fault_from_mapping({"dup": 2, "drop": True, "eta": None}) == Fault(dup=2, drop=True)
    with pytest.raises(FaultError):
        fault_from_mapping({"nope": 1})


def test_defaults_leave_the_shape_to_the_config() -> None:
    """A default fault picks no shape (the config's applies) and fails with a published code."""
    assert Fault().body is None
    assert Fault().error_code == "generation_failed_no_content" in TASK_ERROR_CODES


@pytest.mark.parametrize("shape", ["published", "envelope", "bare"])
def test_body_takes_every_shape(shape: str) -> None:
    """``body`` accepts the published, envelope and bare shapes."""
    assert parse_prompt(f"[sim:body={shape}]") == {"body": shape}
    assert fault_from_mapping({"body": shape}).body == shape


@pytest.mark.parametrize("code", TASK_ERROR_CODES)
def test_error_code_takes_every_published_code(code: str) -> None:
    """``error_code`` accepts each published task error code."""
    assert parse_prompt(f"[sim:error_code={code}]") == {"error_code": code}


@pytest.mark.parametrize(
    "prompt", ["[sim:body=json]", "[sim:error_code=generation_failed]", "[sim:error_code=500]"]
)
def test_unpublished_shapes_and_codes_are_refused(prompt: str) -> None:
    """A shape or error code the provider does not publish is refused."""
    with pytest.raises(FaultError):
        parse_prompt(prompt)
