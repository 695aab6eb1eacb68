"""Each model's own rules: accepted values and their defaults, refusals, output sizes, usage."""

from __future__ import annotations

from typing import Any

import pytest

from app.simulator.validation import Submission

from .helpers import AUTH, Sim

SUBMIT = "/v1/images/generations"
ONE_FIVE, TWO, BETA = "gpt-image-1.5", "gpt-image-2", "gpt-image-2-beta"
REFERENCE = ["https://cdn.example.com/ref.png"]


def body(model: str, **fields: Any) -> dict[str, Any]:
    """A minimal valid submit body for ``model`` with ``fields`` added."""
    return {"model": model, "prompt": "a kite", **fields}


async def accepted(sim: Sim, model: str, **fields: Any) -> tuple[dict[str, Any], Submission]:
    """Submit and return the answer and the submission the simulator recorded."""
    response = await sim.client.post(SUBMIT, json=body(model, **fields), headers=AUTH)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer, sim.state.tasks[answer["id"]].submission


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("model", "size", "resolution", "quality"),
    [(ONE_FIVE, None, None, "high"), (TWO, "auto", "1K", "medium"), (BETA, "auto", "1K", None)],
)
async def test_defaults_per_model(
    sim: Sim, model: str, size: str | None, resolution: str | None, quality: str | None
) -> None:
    """Without options each model applies its own defaults: one image, 1024x1024."""
    answer, submission = await accepted(sim, model)
    assert answer["model"] == model
    assert (submission.size, submission.resolution, submission.quality) == (
        size,
        resolution,
        quality,
    )
    assert (submission.n, submission.width, submission.height) == (1, 1024, 1024)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (ONE_FIVE, {"prompt": "x" * 8000}),
        (ONE_FIVE, {"size": "1536x1024", "quality": "low", "n": 1}),
        (ONE_FIVE, {"image_urls": REFERENCE * 16}),
        (TWO, {"prompt": "é" * 32_000}),
        (TWO, {"size": "1280x512"}),  # exactly the smallest pixel count, 2.5:1
        (TWO, {"size": "3840x1280"}),  # the longest side, exactly 3:1
        (TWO, {"size": "3840x2160", "quality": "high", "n": 10}),
        (TWO, {"size": "1024\u00d71536"}),
        (TWO, {"size": "21:9", "resolution": "4k"}),
        (TWO, {"image_urls": REFERENCE, "mask_url": "https://cdn.example.com/mask.png"}),
        (BETA, {"prompt": "x" * 2000}),
        (BETA, {"size": "9:21", "resolution": "1K"}),
        (BETA, {"size": "auto", "n": 1, "image_urls": REFERENCE * 16}),
    ],
)
async def test_each_model_accepts_its_own_range(
    sim: Sim, model: str, fields: dict[str, Any]
) -> None:
    """Values at the edges of each model's rules are accepted."""
    answer, _ = await accepted(sim, model, **fields)
    assert answer["status"] == "pending"


@pytest.mark.parametrize(
    ("model", "fields", "status", "param"),
    [
        (ONE_FIVE, {"prompt": "x" * 8001}, 400, "prompt"),
        (ONE_FIVE, {"size": "auto"}, 400, "size"),
        (ONE_FIVE, {"size": "16:9"}, 400, "size"),
        (ONE_FIVE, {"size": "1024\u00d71024"}, 400, "size"),
        (ONE_FIVE, {"size": "2048x2048"}, 400, "size"),
        (ONE_FIVE, {"n": 2}, 400, "n"),
        (ONE_FIVE, {"resolution": "1K"}, 400, "resolution"),
        (ONE_FIVE, {"mask_url": "https://a/m.png", "image_urls": REFERENCE}, 400, "mask_url"),
        (TWO, {"prompt": "x" * 32_001}, 400, "prompt"),
        (TWO, {"size": "1000x1000"}, 400, "size"),  # not multiples of 16
        (TWO, {"size": "3856x2048"}, 400, "size"),  # a side over 3840
        (TWO, {"size": "512x512"}, 400, "size"),  # under 655,360 pixels
        (TWO, {"size": "3840x3840"}, 400, "size"),  # over 8,294,400 pixels
        (TWO, {"size": "2400x784"}, 400, "size"),  # longer than 3:1
        (TWO, {"size": "2:5"}, 400, "size"),
        (TWO, {"size": "1024*1024"}, 400, "size"),
        (TWO, {"resolution": "8K"}, 400, "resolution"),
        (TWO, {"resolution": 2}, 422, "resolution"),
        (TWO, {"quality": "ultra"}, 400, "quality"),
        (TWO, {"n": 0}, 400, "n"),
        (TWO, {"n": 11}, 400, "n"),
        (TWO, {"n": 2.0}, 422, "n"),
        (TWO, {"mask_url": "ftp://a/m.png", "image_urls": REFERENCE}, 400, "mask_url"),
        (TWO, {"mask_url": 5}, 422, "mask_url"),
        (TWO, {"image_urls": REFERENCE * 17}, 400, "image_urls"),
        (BETA, {"prompt": "x" * 2001}, 400, "prompt"),
        (BETA, {"size": "2:1"}, 400, "size"),
        (BETA, {"size": "1024x1024"}, 400, "size"),
        (BETA, {"resolution": "2K"}, 400, "resolution"),
        (BETA, {"resolution": "4K"}, 400, "resolution"),
        (BETA, {"quality": "medium"}, 400, "quality"),
        (BETA, {"n": 2}, 400, "n"),
        (BETA, {"mask_url": "https://a/m.png", "image_urls": REFERENCE}, 400, "mask_url"),
        (BETA, {"image_urls": []}, 400, "image_urls"),
    ],
)
@pytest.mark.asyncio
async def test_each_model_refuses_outside_its_rules(
    sim: Sim, model: str, fields: dict[str, Any], status: int, param: str
) -> None:
    """A value outside the model's rules answers 400 (422 for a wrong type), naming the field."""
    response = await sim.client.post(SUBMIT, json=body(model, **fields), headers=AUTH)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert {"code", "message", "type"} <= error.keys()
    assert sim.state.tasks == {}


@pytest.mark.asyncio
async def test_mask_without_reference_images_is_ignored(sim: Sim) -> None:
    """gpt-image-2 ignores mask_url without image_urls, as published; with them it is kept."""
    _, alone = await accepted(sim, TWO, mask_url="not even a URL")
    assert alone.mask_url is None
    _, kept = await accepted(sim, TWO, image_urls=REFERENCE, mask_url="https://a/m.png")
    assert kept.mask_url == "https://a/m.png"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("model", "fields", "size"),
    [
        (ONE_FIVE, {}, (1024, 1024)),
        (ONE_FIVE, {"size": "1:1"}, (1024, 1024)),
        (ONE_FIVE, {"size": "2:3"}, (1024, 1536)),
        (ONE_FIVE, {"size": "3:2"}, (1536, 1024)),
        (ONE_FIVE, {"size": "1024x1536"}, (1024, 1536)),
        (TWO, {"size": "auto", "resolution": "4K"}, (1024, 1024)),  # auto ignores resolution
        (TWO, {"size": "16:9"}, (1360, 768)),
        (TWO, {"size": "9:16", "resolution": "2K"}, (1536, 2736)),
        (TWO, {"size": "21:9", "resolution": "4K"}, (3840, 1632)),
        (TWO, {"size": "1:3", "resolution": "4K"}, (1280, 3840)),
        (TWO, {"size": "1:1", "resolution": "2k"}, (2048, 2048)),
        (TWO, {"size": "2048x1152", "resolution": "4K"}, (2048, 1152)),  # WxH ignores it
        (TWO, {"size": "1152\u00d72048"}, (1152, 2048)),
        (BETA, {"size": "4:5"}, (912, 1152)),
        (BETA, {"size": "21:9"}, (1568, 672)),
    ],
)
async def test_output_size_follows_the_request(
    sim: Sim, model: str, fields: dict[str, Any], size: tuple[int, int]
) -> None:
    """The output W x H comes from the ratio table, the explicit size or 1.5's named sizes."""
    _, submission = await accepted(sim, model, **fields)
    assert (submission.width, submission.height) == size


@pytest.mark.asyncio
@pytest.mark.parametrize(("model", "credits"), [(ONE_FIVE, 2.5), (BETA, 1.5)])
async def test_per_call_models_reserve_a_fixed_price(sim: Sim, model: str, credits: float) -> None:
    """gpt-image-1.5 and the beta bill per call, whatever the size."""
    for size in ("1:1", "3:2"):
        answer, _ = await accepted(sim, model, size=size)
        assert answer["usage"] == {
            "billing_rule": "per_call",
            "credits_reserved": credits,
            "user_group": "default",
        }


@pytest.mark.asyncio
async def test_token_billing_scales_with_n_quality_and_pixels(sim: Sim) -> None:
    """gpt-image-2 bills by tokens: the reservation grows with n, quality and output pixels."""

    async def credits(**fields: Any) -> float:
        answer, _ = await accepted(sim, TWO, **fields)
        assert answer["usage"]["billing_rule"] == "per_token"
        assert answer["usage"]["user_group"] == "default"
        reserved: float = answer["usage"]["credits_reserved"]
        return reserved

    one = await credits()
    assert one > 0
    assert await credits(n=4) == pytest.approx(4 * one)
    assert await credits(n=10) == pytest.approx(10 * one)
    assert await credits(quality="low") < one < await credits(quality="high")
    assert await credits(size="1:1", resolution="2K") == pytest.approx(4 * one)
