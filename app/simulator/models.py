"""The models the provider offers on the submit route, each with its own rules and billing.

gpt-image-2-beta follows StarMagic's own page where the provider's pages
disagree, narrowed further: ``auto`` or one of eleven ratios at ``1K`` only,
no explicit ``WxH``, no ``quality``, one image, no mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from app.simulator import sizes

QUALITIES = ("low", "medium", "high")


@dataclass(frozen=True)
class ModelRules:
    """What one model accepts and how it bills."""

    name: str
    prompt_limit: int
    prompt_unit: Literal["tokens", "characters"]
    # Sizes with a fixed output, written as the provider names them.
    named_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Ratios whose output comes from the ratio table at the requested resolution.
    ratios: tuple[str, ...] = ()
    auto_size: bool = False  # accepts "auto", which is then the default
    explicit_sizes: bool = False  # accepts any WxH within the GPT Image 2 limits
    resolutions: tuple[str, ...] = ()  # empty: the field is refused
    qualities: tuple[str, ...] = ()  # empty: the field is refused
    default_quality: str | None = None
    max_n: int = 1
    masks: bool = False
    billing_rule: str = "per_call"
    credits: float = 0.0  # per call, or per image at medium quality and 1024x1024


_BETA_RATIOS = ("1:1", "3:2", "2:3", "4:3", "3:4", "5:4", "4:5", "16:9", "9:16", "21:9", "9:21")

MODELS: dict[str, ModelRules] = {
    rules.name: rules
    for rules in (
        ModelRules(
            name="gpt-image-1.5",
            prompt_limit=2000,
            prompt_unit="tokens",
            named_sizes={
                "1:1": (1024, 1024),
                "2:3": (1024, 1536),
                "3:2": (1536, 1024),
                "1024x1024": (1024, 1024),
                "1024x1536": (1024, 1536),
                "1536x1024": (1536, 1024),
            },
            qualities=QUALITIES,
            default_quality="high",
            credits=2.5,
        ),
        ModelRules(
            name="gpt-image-2",
            prompt_limit=32_000,
            prompt_unit="characters",
            ratios=sizes.RATIOS,
            auto_size=True,
            explicit_sizes=True,
            resolutions=sizes.RESOLUTIONS,
            qualities=QUALITIES,
            default_quality="medium",
            max_n=10,
            masks=True,
            billing_rule="per_token",
            credits=2.0,
        ),
        ModelRules(
            name="gpt-image-2-beta",
            prompt_limit=2000,
            prompt_unit="characters",
            ratios=_BETA_RATIOS,
            auto_size=True,
            resolutions=("1K",),
            credits=1.5,
        ),
    )
}

# Output tokens, and so cost, relative to medium quality (the mirror's figures at 1024x1024).
QUALITY_COST = {"low": 0.11, "medium": 1.0, "high": 4.0}
_MEGAPIXEL = 1024 * 1024


def output_size(rules: ModelRules, size: str | None, resolution: str | None) -> tuple[int, int]:
    """The WxH a valid request implies: ``auto`` and no size give 1024x1024."""
    if size is None or size == "auto":
        return sizes.AUTO_SIZE
    if size in rules.named_sizes:
        return rules.named_sizes[size]
    if size in rules.ratios:
        return sizes.ratio_size(size, resolution or sizes.RESOLUTIONS[0])
    explicit = sizes.parse_wxh(size)
    if explicit is None:
        raise ValueError(f"{size!r} is not a size of {rules.name}")
    return explicit


def usage(
    rules: ModelRules, *, n: int, quality: str | None, width: int, height: int
) -> dict[str, Any]:
    """The submit answer's ``usage``: a fixed price per call, or a token-based estimate."""
    credits = rules.credits
    if rules.billing_rule == "per_token":
        # Every image is billed; tokens grow with quality and with the pixels drawn.
        credits *= n * QUALITY_COST[quality or "medium"] * (width * height / _MEGAPIXEL)
    return {
        "billing_rule": rules.billing_rule,
        "credits_reserved": round(credits, 4),
        "user_group": "default",
    }
