"""Image links: real PNG bytes, 24 h expiry, renewal, and each image fault."""

from __future__ import annotations

import io
import time
import zlib

import pytest
from PIL import Image

from app.simulator import images

from .helpers import Sim, SimFactory


async def image_url(sim: Sim, prompt: str = "a red fox") -> tuple[str, str]:
    """Submit, wait for completion, and return (task id, image url)."""
    answer = await sim.completed(prompt)
    (url,) = answer["results"]
    return answer["id"], url


@pytest.mark.asyncio
async def test_link_serves_a_deterministic_png(make_sim: SimFactory) -> None:
    """With image_size pinned, the link answers a PNG of that size, the same bytes on every GET."""
    sim = await make_sim(image_size=(40, 30))
    task_id, url = await image_url(sim)
    first = await sim.client.get(url)
    assert first.status_code == 200
    assert first.headers["content-type"] == "image/png"
    assert int(first.headers["content-length"]) == len(first.content)
    with Image.open(io.BytesIO(first.content)) as image:
        image.load()
        assert image.size == (40, 30)
    assert (await sim.client.get(url)).content == first.content
    assert first.content == images.render_png(task_id, 40, 30)
    assert first.content != images.render_png("another task", 40, 30)


@pytest.mark.asyncio
async def test_unknown_link_is_404(sim: Sim) -> None:
    """A made-up file name answers 404."""
    assert (await sim.client.get("/files/nothing.png")).status_code == 404


@pytest.mark.asyncio
async def test_image_503_then_success(sim: Sim) -> None:
    """``image_503=2`` answers 503 twice, then the image."""
    _, url = await image_url(sim, "[sim:image_503=2]")
    codes = [(await sim.client.get(url)).status_code for _ in range(3)]
    assert codes == [503, 503, 200]


@pytest.mark.asyncio
async def test_image_expired_is_renewed_by_a_query(sim: Sim) -> None:
    """``image_expired``: 403 until refused once; the next query hands out a fresh working link."""
    task_id, url = await image_url(sim, "[sim:image_expired]")
    assert (await sim.query(task_id))["results"] == [url]  # not refused yet
    refused = await sim.client.get(url)
    assert refused.status_code == 403
    (fresh,) = (await sim.query(task_id))["results"]
    assert fresh != url
    assert sim.state.links[fresh.rsplit("/", 1)[1]].expires_at >= time.time() + 86_000
    assert (await sim.client.get(fresh)).status_code == 200
    assert (await sim.client.get(url)).status_code == 403
    assert (await sim.query(task_id))["results"] == [fresh]


@pytest.mark.asyncio
async def test_expire_route_revokes_the_current_link(sim: Sim) -> None:
    """``POST /_sim/tasks/{id}/expire`` turns a working link into a 403 until renewed."""
    task_id, url = await image_url(sim)
    assert (await sim.client.post(f"/_sim/tasks/{task_id}/expire")).status_code == 200
    assert (await sim.client.get(url)).status_code == 403
    (renewed,) = (await sim.query(task_id))["results"]
    assert (await sim.client.get(renewed)).status_code == 200


@pytest.mark.asyncio
async def test_image_size_pads_to_an_exact_valid_png(sim: Sim) -> None:
    """``image_size`` serves exactly that many bytes, still a PNG that decodes."""
    size = 3_000_000
    _, url = await image_url(sim, f"[sim:image_size={size}]")
    response = await sim.client.get(url)
    assert int(response.headers["content-length"]) == size
    assert len(response.content) == size
    with Image.open(io.BytesIO(response.content)) as image:
        image.load()


@pytest.mark.asyncio
async def test_padding_is_streamed_in_small_valid_chunks() -> None:
    """Padding across several PNG chunks streams in pieces of at most 64 KiB with good CRCs."""
    base = images.render_png("seed", 8, 8)
    target = images.MAX_PAD_CHUNK + 5_000_000
    pieces = [piece async for piece in images.padded_png(base, target)]
    assert max(len(piece) for piece in pieces[1:-1]) <= images.PIECE
    data = b"".join(pieces)
    assert len(data) == target == images.padded_size(base, target)
    position, kinds = 8, []
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        crc = int.from_bytes(data[position + 8 + length : position + 12 + length], "big")
        assert zlib.crc32(data[position + 4 : position + 8 + length]) == crc
        kinds.append(kind)
        position += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"pdAt", b"pdAt", b"IEND"]


@pytest.mark.asyncio
async def test_image_slow_trickles(sim: Sim) -> None:
    """``image_slow=0.4`` takes about that long to deliver the body."""
    _, url = await image_url(sim, "[sim:image_slow=0.4]")
    started = time.monotonic()
    response = await sim.client.get(url)
    assert 0.35 <= time.monotonic() - started < 2
    assert response.content.startswith(images.PNG_SIGNATURE)


@pytest.mark.asyncio
async def test_not_image_serves_html_labelled_png(sim: Sim) -> None:
    """``not_image`` serves an HTML page with Content-Type image/png."""
    _, url = await image_url(sim, "[sim:not_image]")
    response = await sim.client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"<!doctype html>")


@pytest.mark.asyncio
async def test_oversize_stream_has_no_length(make_sim: SimFactory) -> None:
    """``oversize`` streams oversize_bytes with no Content-Length, starting like a PNG."""
    sim = await make_sim(oversize_bytes=2_000_000)
    _, url = await image_url(sim, "[sim:oversize]")
    response = await sim.client.get(url)
    assert "content-length" not in response.headers
    assert len(response.content) == 2_000_000
    assert response.content.startswith(images.PNG_SIGNATURE)


@pytest.mark.asyncio
async def test_oversize_header_claims_more_than_it_sends(make_sim: SimFactory) -> None:
    """``oversize=header`` announces oversize_bytes but sends the small PNG."""
    sim = await make_sim(oversize_bytes=2_000_000)
    task_id, url = await image_url(sim, "[sim:oversize=header]")
    response = await sim.client.get(url)
    assert response.headers["content-length"] == "2000000"
    assert response.content == images.render_png(task_id, 1024, 1024)


@pytest.mark.asyncio
async def test_redirect_to(sim: Sim) -> None:
    """``redirect_to`` answers 302 to the given address."""
    _, url = await image_url(sim, "[sim:redirect_to=http://169.254.169.254/latest/meta-data]")
    response = await sim.client.get(url)
    assert response.status_code == 302
    assert response.headers["location"] == "http://169.254.169.254/latest/meta-data"


@pytest.mark.asyncio
async def test_image_gets_are_counted(sim: Sim) -> None:
    """Stats count image GETs per task and per link, refusals included."""
    task_id, url = await image_url(sim, "[sim:image_503=1]")
    await sim.client.get(url)
    await sim.client.get(url)
    stats = (await sim.client.get("/_sim/stats")).json()
    name = url.rsplit("/", 1)[1]
    assert stats["image_gets"] == 2
    assert stats["image_gets_per_task"] == {task_id: 2}
    assert stats["image_gets_per_link"] == {name: 2}
