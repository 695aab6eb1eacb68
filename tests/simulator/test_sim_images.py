"""Image links: real PNG bytes, 24 h expiry, renewal, and each image fault."""

from __future__ import annotations

import asyncio
import io
import time
import zlib
from typing import Any

import pytest
from PIL import Image

from app.simulator import images

from .helpers import Sim, SimFactory


async def image_url(sim: Sim, prompt: str = "a red fox", **fields: Any) -> tuple[str, str]:
    """Submit, wait for completion, and return (task id, image url)."""
    answer = await sim.completed(prompt, **fields)
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
async def test_image_slow_still_delivers_the_whole_image(sim: Sim) -> None:
    """``image_slow`` changes the pace only (see test_sim_app, over a socket), not the bytes."""
    _, url = await image_url(sim, "[sim:image_slow=0.2]")
    response = await sim.client.get(url)
    assert response.status_code == 200
    assert len(response.content) == int(response.headers["content-length"])
    assert response.content.startswith(images.PNG_SIGNATURE)
    assert response.content.endswith(b"IEND\xaeB`\x82")


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


def decoded_size(content: bytes) -> tuple[int, int]:
    """The pixel size of a PNG, after decoding it fully."""
    with Image.open(io.BytesIO(content)) as image:
        image.load()
        return image.size


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fields", "size"),
    [
        ({"model": "gpt-image-1.5"}, (1024, 1024)),
        ({"model": "gpt-image-1.5", "size": "2:3"}, (1024, 1536)),
        ({"model": "gpt-image-2", "size": "9:16", "resolution": "2K"}, (1536, 2736)),
        ({"model": "gpt-image-2", "size": "3840x2160"}, (3840, 2160)),
        ({"model": "gpt-image-2-beta", "size": "21:9"}, (1568, 672)),
    ],
)
async def test_served_image_has_the_requested_size(
    sim: Sim, fields: dict[str, Any], size: tuple[int, int]
) -> None:
    """Unpinned, each image is a PNG of the output size its request implies."""
    task_id, url = await image_url(sim, **fields)
    response = await sim.client.get(url)
    assert response.status_code == 200
    assert decoded_size(response.content) == size
    assert response.content == images.render_png(task_id, *size)


@pytest.mark.asyncio
async def test_pinned_size_overrides_the_request(make_sim: SimFactory) -> None:
    """``image_size`` serves every image at that size, even for a 4K request."""
    sim = await make_sim(image_size=(32, 16))
    _, url = await image_url(sim, model="gpt-image-2", size="16:9", resolution="4K")
    assert decoded_size((await sim.client.get(url)).content) == (32, 16)


def test_large_render_is_compact_and_varied() -> None:
    """A 3840x2160 image decodes at full size, stays small on the wire, and is not flat."""
    png = images.render_png("task-unified-1-abcdefgh", 3840, 2160)
    assert len(png) < 1_000_000
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        assert image.size == (3840, 2160)
        corners = {image.getpixel((x, y)) for x in (0, 3839) for y in (0, 2159)}
    assert len(corners) == 4


@pytest.mark.asyncio
async def test_several_images_each_with_their_own_link_and_bytes(sim: Sim) -> None:
    """n=3 mints three links in order; each serves its own PNG, seeded by task id and index."""
    task = await sim.submit(model="gpt-image-2", n=3, size="1:1")
    await sim.wait_status(task["id"], "completed")
    urls = (await sim.query(task["id"]))["results"]
    assert len(urls) == len(set(urls)) == 3
    bodies = [(await sim.client.get(url)).content for url in urls]
    assert len(set(bodies)) == 3
    for index, content in enumerate(bodies):
        assert content == images.render_png(images.image_seed(task["id"], index), 1024, 1024)
    assert images.image_seed(task["id"], 0) == task["id"]
    await sim.client.get(urls[1])
    stats = (await sim.client.get("/_sim/stats")).json()
    per_link = stats["image_gets_per_link"]
    assert [per_link[url.rsplit("/", 1)[1]] for url in urls] == [1, 2, 1]
    assert stats["image_gets_per_task"] == {task["id"]: 4}


@pytest.mark.asyncio
async def test_several_images_in_the_enveloped_shape(sim: Sim) -> None:
    """The envelope lists one entry per image, in the same order as the links."""
    task = await sim.submit("[sim:body=envelope]", model="gpt-image-2", n=4)
    await sim.wait_status(task["id"], "completed")
    entries = (await sim.query_data(task["id"]))["result"]["images"]
    links = sim.state.tasks[task["id"]].current_links
    assert [entry["url"] for entry in entries] == [link.url for link in links]
    assert [link.index for link in links] == [0, 1, 2, 3]
    assert all(entry["expires_at"] == links[0].expires_at for entry in entries)


@pytest.mark.asyncio
async def test_each_image_is_rendered_once(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent and repeated GETs of a task's images render each image exactly once."""
    rendered: list[str] = []
    real = images.render_png

    def counting(seed: str, width: int, height: int) -> bytes:
        rendered.append(seed)
        return real(seed, width, height)

    monkeypatch.setattr(images, "render_png", counting)
    task = await sim.submit(model="gpt-image-2", n=2)
    await sim.wait_status(task["id"], "completed")
    urls = (await sim.query(task["id"]))["results"]
    responses = await asyncio.gather(*(sim.client.get(url) for url in urls * 4))
    assert {response.status_code for response in responses} == {200}
    await sim.client.get(urls[0])
    assert sorted(rendered) == sorted(images.image_seed(task["id"], i) for i in range(2))


@pytest.mark.asyncio
async def test_expired_links_of_every_image_are_renewed(sim: Sim) -> None:
    """``image_expired`` with n=2: both links refuse, and the next query renews both."""
    task = await sim.submit("[sim:image_expired]", model="gpt-image-2", n=2)
    await sim.wait_status(task["id"], "completed")
    old = (await sim.query(task["id"]))["results"]
    assert [(await sim.client.get(url)).status_code for url in old] == [403, 403]
    fresh = (await sim.query(task["id"]))["results"]
    assert len(fresh) == 2
    assert not set(fresh) & set(old)
    assert [(await sim.client.get(url)).status_code for url in fresh] == [200, 200]
