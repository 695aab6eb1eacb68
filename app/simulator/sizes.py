"""Output sizes: the ratio table, explicit ``WxH`` sizes and their limits.

The GPT Image 2 output table gives landscape WxH per ratio and resolution;
portrait ratios swap the sides. Ratios whose 4K size would exceed the pixel
budget are already scaled down in the table, as the provider does.
"""

from __future__ import annotations

import re

RESOLUTIONS = ("1K", "2K", "4K")

# Landscape (or square) WxH at 1K, 2K and 4K.
_LANDSCAPE: dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    "1:1": ((1024, 1024), (2048, 2048), (2880, 2880)),
    "2:1": ((1456, 720), (2896, 1456), (3840, 1920)),
    "3:1": ((1776, 592), (3552, 1184), (3840, 1280)),
    "3:2": ((1248, 832), (2512, 1680), (3520, 2352)),
    "4:3": ((1184, 880), (2368, 1776), (3312, 2480)),
    "5:4": ((1152, 912), (2288, 1824), (3216, 2576)),
    "16:9": ((1360, 768), (2736, 1536), (3840, 2160)),
    "21:9": ((1568, 672), (3136, 1344), (3840, 1632)),
}
_PORTRAIT = {"1:2": "2:1", "1:3": "3:1", "2:3": "3:2", "3:4": "4:3", "4:5": "5:4"}
_PORTRAIT |= {"9:16": "16:9", "9:21": "21:9"}

# gpt-image-2's fifteen ratios, in the order its page lists them.
RATIOS = (
    *("1:1", "1:2", "2:1", "1:3", "3:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4"),
    *("9:16", "16:9", "9:21", "21:9"),
)

AUTO_SIZE = (1024, 1024)
SIDE_STEP = 16
MIN_SIDE, MAX_SIDE = 16, 3840
MIN_PIXELS, MAX_PIXELS = 655_360, 8_294_400
MAX_ASPECT = 3

_WXH = re.compile("(\\d{1,5})[x\u00d7](\\d{1,5})")  # "x" or the multiplication sign


def ratio_size(ratio: str, resolution: str) -> tuple[int, int]:
    """The output WxH of ``ratio`` (in ``RATIOS``) at ``resolution`` (in ``RESOLUTIONS``)."""
    tier = RESOLUTIONS.index(resolution)
    if ratio in _PORTRAIT:
        width, height = _LANDSCAPE[_PORTRAIT[ratio]][tier]
        return height, width
    return _LANDSCAPE[ratio][tier]


def parse_wxh(size: str) -> tuple[int, int] | None:
    """``(W, H)`` from ``"WxH"`` (``x`` or the sign U+00D7 between); None for other text."""
    match = _WXH.fullmatch(size)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def wxh_problem(width: int, height: int) -> str | None:
    """Why gpt-image-2 refuses an explicit WxH, or None when it accepts it."""
    if width % SIDE_STEP or height % SIDE_STEP:
        return f"both sides must be multiples of {SIDE_STEP}"
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        return f"each side must be {MIN_SIDE} to {MAX_SIDE} pixels"
    if not MIN_PIXELS <= width * height <= MAX_PIXELS:
        return f"width times height must be {MIN_PIXELS:,} to {MAX_PIXELS:,} pixels"
    if max(width, height) > MAX_ASPECT * min(width, height):
        return f"the long side must be at most {MAX_ASPECT} times the short side"
    return None
