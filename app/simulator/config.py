"""Settings of one simulator instance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from app.simulator.faults import SHAPES, Fault, Shape

MAX_IMAGE_SIDE = 4096


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulated StarMagic behaves; the defaults follow the real provider."""

    api_key: str = "sim-key"
    # Origin plus mount prefix at which clients reach the simulator; image links start with it.
    public_base_url: str = "http://127.0.0.1:9000"
    # Multiplies the processing timeline (not callback retries, which keep real seconds).
    time_scale: float = 1.0
    # Seconds reported as estimated_time, before scaling.
    estimated_time: int = 100
    # The provider's documented policy: at most 3 retries, 1, 2 and 4 s after each failure.
    retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0)
    callback_timeout: float = 10.0
    # The provider wants https callbacks on public addresses; local setups need http on loopback.
    allow_http_callbacks: bool = False
    default_faults: Fault = field(default_factory=Fault)
    # Shape of query answers and callbacks unless a task's `body` fault says otherwise.
    body_shape: Shape = "published"
    # DELETE /v1/tasks/{id}: unpublished; without it the route answers as a provider lacking it.
    cancel_supported: bool = True
    cancel_unsupported_status: Literal[404, 405] = 405
    # Pins every image to this (width, height) whatever the request implies: small and fast.
    image_size: tuple[int, int] | None = None
    link_ttl_seconds: int = 86_400
    # Body size of the `oversize` fault.
    oversize_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if self.callback_timeout <= 0:
            raise ValueError("callback_timeout must be positive")
        if any(delay < 0 for delay in self.retry_delays):
            raise ValueError("retry_delays must not be negative")
        if self.body_shape not in SHAPES:
            raise ValueError(f"body_shape must be one of {', '.join(SHAPES)}")
        if self.cancel_unsupported_status not in (404, 405):
            raise ValueError("cancel_unsupported_status must be 404 or 405")
        if self.image_size is not None and (
            len(self.image_size) != 2
            or not all(1 <= side <= MAX_IMAGE_SIDE for side in self.image_size)
        ):
            raise ValueError(f"image_size must be (width, height), each 1..{MAX_IMAGE_SIDE}")
        object.__setattr__(self, "public_base_url", self.public_base_url.rstrip("/"))
