"""Each model's published request rules, boundary by boundary."""

from __future__ import annotations

import pytest

from app.model_rules import (
    BETA_RATIOS,
    GPT_IMAGE_2_RATIOS,
    KNOWN_MODELS,
    RULES,
    FieldError,
    RequestFields,
    check,
    judgeable_fields,
    normalise_resolution,
)

V15, V2, BETA = "gpt-image-1.5", "gpt-image-2", "gpt-image-2-beta"
REF = ["https://images.example.com/ref.png"]
MASK = "https://images.example.com/mask.png"
TIMES = "\u00d7"  # the multiplication sign, which the provider takes in place of x


def fields(**values: object) -> RequestFields:
    """Request fields with a short prompt unless one is given."""
    values.setdefault("prompt", "a lighthouse")
    return RequestFields(**values)  # type: ignore[arg-type]


ACCEPTED = [
    # gpt-image-1.5: its six sizes, three qualities, n 1, 6000 UTF-8 bytes
    *[(V15, fields(size=size)) for size in RULES[V15].sizes],
    *[(V15, fields(quality=quality)) for quality in ("low", "medium", "high")],
    (V15, fields(n=1, image_urls=REF * 16)),
    (V15, fields(prompt="x" * 6000)),
    (V15, fields(prompt="é" * 3000)),
    # gpt-image-2: auto, 15 ratios, explicit sizes on every edge
    *[(V2, fields(size=size)) for size in ("auto", *GPT_IMAGE_2_RATIOS)],
    (V2, fields(size="3840x2160")),  # longest side, and exactly the most pixels
    (V2, fields(size="2160x3840")),
    (V2, fields(size="1024x640")),  # exactly the fewest pixels
    (V2, fields(size="640x1024")),
    (V2, fields(size="2304x768")),  # exactly 3:1
    (V2, fields(size="768x2304")),
    (V2, fields(size=f"1024{TIMES}1024")),  # the multiplication sign
    *[(V2, fields(size="16:9", resolution=value)) for value in ("1K", "2k", "4K", "4k")],
    (V2, fields(quality="low", n=10)),
    (V2, fields(n=1)),
    (V2, fields(image_urls=REF, mask_url=MASK)),
    (V2, fields(prompt="界" * 32_000)),  # code points, not bytes
    (V2, fields(prompt="😀" * 32_000)),  # code points, not UTF-16 units
    # gpt-image-2-beta: auto, StarMagic's 11 ratios, 1K only
    *[(BETA, fields(size=size)) for size in ("auto", *BETA_RATIOS)],
    (BETA, fields(size="21:9", resolution="1k")),
    (BETA, fields(n=1, image_urls=REF * 16)),
    (BETA, fields(prompt="x" * 2000)),
    (BETA, fields(prompt="界" * 2000)),  # 6000 UTF-8 bytes exactly
]


@pytest.mark.parametrize(("model", "request_fields"), ACCEPTED)
def test_requests_within_the_rules_pass(model: str, request_fields: RequestFields) -> None:
    """Every documented value and every edge that is still inside the rules passes."""
    assert check(model, request_fields) == []


def errors(*pairs: tuple[str, str]) -> list[FieldError]:
    """Expected breaches, in the order check() reports them."""
    return [FieldError(field, reason) for field, reason in pairs]


V2_SIZE_SHAPES = (
    "must be auto, a ratio (1:1, 1:2, 2:1, 1:3, 3:1, 2:3, 3:2, 3:4, 4:3, 4:5, 5:4, "
    f"9:16, 16:9, 9:21, 21:9) or WxH (x or {TIMES} between) for gpt-image-2"
)
BETA_SIZES = "auto, 1:1, 3:2, 2:3, 4:3, 3:4, 5:4, 4:5, 16:9, 9:16, 21:9 or 9:21"
V15_SIZES = "must be 1:1, 2:3, 3:2, 1024x1024, 1024x1536 or 1536x1024 for gpt-image-1.5"

REFUSED = [
    # gpt-image-1.5
    (V15, fields(prompt="x" * 6001), errors(("prompt", "is too long: at most 6000 UTF-8 bytes"))),
    (V15, fields(prompt="é" * 3001), errors(("prompt", "is too long: at most 6000 UTF-8 bytes"))),
    *[
        (V15, fields(size=size), errors(("size", V15_SIZES)))
        for size in ("auto", "16:9", "512x512")
    ],
    (V15, fields(size=f"1024{TIMES}1024"), errors(("size", V15_SIZES))),
    (V15, fields(quality="ultra"), errors(("quality", "must be low, medium or high"))),
    (V15, fields(quality="High"), errors(("quality", "must be low, medium or high"))),
    (V15, fields(n=2), errors(("n", "must be 1 for gpt-image-1.5"))),
    (V15, fields(n=0), errors(("n", "must be 1 for gpt-image-1.5"))),
    (V15, fields(resolution="1K"), errors(("resolution", "is not offered by gpt-image-1.5"))),
    (
        V15,
        fields(image_urls=REF, mask_url=MASK),
        errors(("mask_url", "is not offered by gpt-image-1.5")),
    ),
    # gpt-image-2: every broken limit of an explicit size has its own reason
    (V2, fields(size="1000x1008"), errors(("size", "width 1000 is not a multiple of 16"))),
    (V2, fields(size="1008x1000"), errors(("size", "height 1000 is not a multiple of 16"))),
    (V2, fields(size="3856x2048"), errors(("size", "width 3856 is outside 16 to 3840"))),
    (V2, fields(size="2048x3856"), errors(("size", "height 3856 is outside 16 to 3840"))),
    (
        V2,
        fields(size="15x3840"),
        errors(
            ("size", "width 15 is outside 16 to 3840"),
            ("size", "width 15 is not a multiple of 16"),
            ("size", "15x3840 is 57,600 pixels, fewer than 655,360"),
            ("size", "15x3840 has a long:short side ratio over 3:1"),
        ),
    ),
    (  # 16 is a valid side: only the pixel count and the ratio are wrong
        V2,
        fields(size="16x3840"),
        errors(
            ("size", "16x3840 is 61,440 pixels, fewer than 655,360"),
            ("size", "16x3840 has a long:short side ratio over 3:1"),
        ),
    ),
    (
        V2,
        fields(size="1024x624"),
        errors(("size", "1024x624 is 638,976 pixels, fewer than 655,360")),
    ),
    (
        V2,
        fields(size="3840x2176"),
        errors(("size", "3840x2176 is 8,355,840 pixels, more than 8,294,400")),
    ),
    (
        V2,
        fields(size="2320x768"),
        errors(("size", "2320x768 has a long:short side ratio over 3:1")),
    ),
    (
        V2,
        fields(size="768x2320"),
        errors(("size", "768x2320 has a long:short side ratio over 3:1")),
    ),
    *[
        (V2, fields(size=size), errors(("size", V2_SIZE_SHAPES)))
        for size in ("7:5", "1024X1024", " 1024x1024", "01024x1024", "0x0", "1024*1024", "")
    ],
    (V2, fields(size="1" * 10 + "x16"), errors(("size", V2_SIZE_SHAPES))),
    (V2, fields(resolution="8K"), errors(("resolution", "must be 1K, 2K or 4K for gpt-image-2"))),
    (V2, fields(resolution=""), errors(("resolution", "must be 1K, 2K or 4K for gpt-image-2"))),
    (V2, fields(quality="best"), errors(("quality", "must be low, medium or high"))),
    (V2, fields(n=11), errors(("n", "must be from 1 to 10 for gpt-image-2"))),
    (V2, fields(n=0), errors(("n", "must be from 1 to 10 for gpt-image-2"))),
    (
        V2,
        fields(prompt="界" * 32_001),
        errors(("prompt", "is too long: at most 32000 characters")),
    ),
    (
        V2,
        fields(mask_url=MASK),
        errors(("mask_url", "needs image_urls: it masks a reference image")),
    ),
    (
        V2,
        fields(image_urls=REF, mask_url="http://images.example.com/mask.png"),
        errors(("mask_url", "must be an https:// URL: 'http://images.example.com/mask.png'")),
    ),
    (
        V2,
        fields(image_urls=[], mask_url="https://e.com/a\nb.png"),
        errors(
            ("image_urls", "must hold 1 to 16 URLs"),
            ("mask_url", "must not contain control characters or invalid Unicode"),
            ("mask_url", "needs image_urls: it masks a reference image"),
        ),
    ),
    # gpt-image-2-beta: the narrower of the provider's pages
    *[
        (BETA, fields(size=size), errors(("size", f"must be {BETA_SIZES} for gpt-image-2-beta")))
        for size in ("2:1", "1:2", "3:1", "1:3", "1K")
    ],
    *[
        (
            BETA,
            fields(size=size),
            errors(("size", f"gpt-image-2-beta takes no explicit WxH size; use {BETA_SIZES}")),
        )
        for size in ("1024x1024", f"1024{TIMES}1024")
    ],
    *[
        (BETA, fields(resolution=value), errors(("resolution", "must be 1K for gpt-image-2-beta")))
        for value in ("2K", "4k")
    ],
    (BETA, fields(quality="high"), errors(("quality", "is not offered by gpt-image-2-beta"))),
    (BETA, fields(n=2), errors(("n", "must be 1 for gpt-image-2-beta"))),
    (
        BETA,
        fields(image_urls=REF, mask_url=MASK),
        errors(("mask_url", "is not offered by gpt-image-2-beta")),
    ),
    (BETA, fields(prompt="x" * 2001), errors(("prompt", "is too long: at most 2000 characters"))),
    (  # 1501 characters but 6004 bytes
        BETA,
        fields(prompt="😀" * 1501),
        errors(("prompt", "is too long: at most 6000 UTF-8 bytes")),
    ),
    (
        BETA,
        fields(prompt="😀" * 2001),
        errors(
            ("prompt", "is too long: at most 2000 characters"),
            ("prompt", "is too long: at most 6000 UTF-8 bytes"),
        ),
    ),
    # every model: image_urls
    *[
        (model, fields(image_urls=urls), errors(("image_urls", "must hold 1 to 16 URLs")))
        for model in KNOWN_MODELS
        for urls in ([], REF * 17)
    ],
    *[
        (
            model,
            fields(image_urls=[*REF, "http://e.com/a.png"]),
            errors(("image_urls.1", "must be an https:// URL: 'http://e.com/a.png'")),
        )
        for model in KNOWN_MODELS
    ],
    (
        V15,
        fields(image_urls=["https://e.com/a\x00.png", "ftp://e.com/b.png"]),
        errors(
            ("image_urls.0", "must not contain control characters or invalid Unicode"),
            ("image_urls.1", "must be an https:// URL: 'ftp://e.com/b.png'"),
        ),
    ),
    (
        V15,
        fields(image_urls=["https://e.com/" + "a" * 2040]),
        errors(("image_urls.0", "must be at most 2048 characters")),
    ),
    # several broken rules at once: all of them, each under its own field
    (
        V2,
        fields(size="1000x5000", resolution="8k", n=11, mask_url="http://x.example/m.png"),
        errors(
            ("size", "width 1000 is not a multiple of 16"),
            ("size", "height 5000 is outside 16 to 3840"),
            ("size", "height 5000 is not a multiple of 16"),
            ("size", "1000x5000 has a long:short side ratio over 3:1"),
            ("resolution", "must be 1K, 2K or 4K for gpt-image-2"),
            ("n", "must be from 1 to 10 for gpt-image-2"),
            ("mask_url", "must be an https:// URL: 'http://x.example/m.png'"),
            ("mask_url", "needs image_urls: it masks a reference image"),
        ),
    ),
    (
        "gpt-image-3",
        fields(),
        errors(("model", "must be one of gpt-image-1.5, gpt-image-2, gpt-image-2-beta")),
    ),
]


@pytest.mark.parametrize(("model", "request_fields", "expected"), REFUSED)
def test_each_broken_rule_is_reported_with_its_field_and_reason(
    model: str, request_fields: RequestFields, expected: list[FieldError]
) -> None:
    """check() lists exactly the broken rules, each under its field with a precise reason."""
    assert check(model, request_fields) == expected


def test_each_model_declares_the_providers_defaults() -> None:
    """The provider's defaults per model: 1.5 high quality; GPT Image 2 auto, 1K, medium."""
    assert RULES[V15].defaults() == {"n": 1, "quality": "high"}
    assert RULES[V2].defaults() == {"n": 1, "size": "auto", "resolution": "1K", "quality": "medium"}
    assert RULES[BETA].defaults() == {"n": 1, "size": "auto", "resolution": "1K"}
    assert KNOWN_MODELS == (V15, V2, BETA)


def test_each_default_passes_its_own_models_rules() -> None:
    """A model's defaults, sent explicitly, are accepted by that model."""
    for model, rules in RULES.items():
        assert check(model, RequestFields(prompt="p", **rules.defaults())) == []  # type: ignore[arg-type]


def test_only_models_that_take_n_get_it_sent() -> None:
    """The beta's body has no `n` field; 1.5 takes only 1; gpt-image-2 up to 10."""
    assert {model: (rules.sends_n, rules.max_n) for model, rules in RULES.items()} == {
        V15: (True, 1),
        V2: (True, 10),
        BETA: (False, 1),
    }


@pytest.mark.parametrize(("given", "kept"), [("1k", "1K"), ("2K", "2K"), ("4k", "4K")])
def test_resolution_is_kept_in_upper_case(given: str, kept: str) -> None:
    """The provider reads resolution case-insensitively; one spelling is kept."""
    assert normalise_resolution(given) == kept


def test_judgeable_fields_keep_only_well_typed_fields_that_did_not_fail() -> None:
    """Fields refused elsewhere, or of the wrong JSON type, are left out of the rule check."""
    raw = {
        "prompt": "   ",
        "size": "2:1",
        "resolution": 2,
        "quality": "high",
        "n": True,
        "image_urls": [*REF, 7],
        "mask_url": MASK,
    }
    assert judgeable_fields(raw, {"prompt"}) == (
        V15,
        RequestFields(size="2:1", quality="high", mask_url=MASK),
    )


@pytest.mark.parametrize(
    ("raw", "failed"),
    [
        ([{"model": V2}], set()),
        ({"model": "gpt-image-2", "prompt": "p"}, {"model"}),
        ({"model": None, "prompt": "p"}, set()),
    ],
)
def test_nothing_is_judgeable_without_a_known_model_and_an_object(
    raw: object, failed: set[str]
) -> None:
    """A body that is not an object, or whose model failed, is not judged by any model's rules."""
    assert judgeable_fields(raw, failed) is None


def test_a_mask_is_not_judged_when_its_references_failed() -> None:
    """Without valid image_urls the mask cannot be judged, so it is not called orphaned."""
    raw = {"model": V2, "image_urls": REF[0], "mask_url": MASK}
    assert judgeable_fields(raw, {"image_urls"}) == (V2, RequestFields())
    assert judgeable_fields({"model": V2, "mask_url": MASK}, set()) == (
        V2,
        RequestFields(mask_url=MASK),
    )
