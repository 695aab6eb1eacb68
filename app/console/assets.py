"""The console's static files, served under names that carry their content hash
(`console.3f2a9c1b.css`), so a browser may keep each one for a year."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

STATIC_DIR = Path(__file__).with_name("static")
_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True)
class Asset:
    name: str  # the hashed name in URLs
    body: bytes
    media_type: str


class Assets:
    """Every file in the static directory, read once, by plain and hashed name."""

    def __init__(self, directory: Path = STATIC_DIR) -> None:
        self.by_hashed: dict[str, Asset] = {}
        self.hashed_name: dict[str, str] = {}
        for path in sorted(directory.iterdir()):
            if path.suffix not in _TYPES:
                continue
            body = path.read_bytes()
            digest = hashlib.sha256(body).hexdigest()[:10]
            hashed = f"{path.stem}.{digest}{path.suffix}"
            self.by_hashed[hashed] = Asset(hashed, body, _TYPES[path.suffix])
            self.hashed_name[path.name] = hashed

    def url_name(self, name: str) -> str:
        """The hashed name of a static file (KeyError for one that is not shipped)."""
        return self.hashed_name[name]
