"""STORAGE_URL parsing and the key layout."""

from __future__ import annotations

from datetime import date

import pytest

from app.storage import image_key, storage_from_url


@pytest.mark.parametrize(
    "url",
    [
        "", "images", "ftp://host/images", "http://bucket/x", "gs://bucket/x", "file://",
        "file:///", "s3://", "s3:///prefix", "s3://Upper-Case/x", "s3://ab/x",
        "s3://bad_bucket/x", "s3://key:secret@bucket-one/x", "s3://bucket-one/a/../b",
        "s3://bucket-one/a//b", "s3://bucket-one/x?region=eu", "file:///srv/images#frag",
    ],
)  # fmt: skip
def test_unusable_urls_are_refused_with_a_reason(url: str) -> None:
    """Each unusable URL raises ValueError with a one-line reason."""
    with pytest.raises(ValueError, match=r"^[^\n]+$"):
        storage_from_url(url)


def test_image_key_layout() -> None:
    """Keys are yyyy/mm/dd/<task id>.<ext>."""
    assert image_key("0193c2ab", date(2025, 1, 9), "png") == "2025/01/09/0193c2ab.png"
    assert image_key("t", date(2025, 12, 31), ".webp") == "2025/12/31/t.webp"
    with pytest.raises(ValueError, match="invalid storage key"):
        image_key("../../etc/passwd", date(2025, 1, 1), "png")
