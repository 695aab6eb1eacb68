"""Settings of one simulator instance."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.simulator.faults import Fault


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
    image_width: int = 64
    image_height: int = 64
    link_ttl_seconds: int = 86_400
    # Body size of the `oversize` fault.
    oversize_bytes: int = 256 * 1024 * 1024
    credits_per_call: float = 2.5

    def __post_init__(self) -> None:
        if self.time_scale <= 0:
            raise ValueError("time_scale must be positive")
        if self.callback_timeout <= 0:
            raise ValueError("callback_timeout must be positive")
        if any(delay < 0 for delay in self.retry_delays):
            raise ValueError("retry_delays must not be negative")
        if not 1 <= self.image_width <= 4096 or not 1 <= self.image_height <= 4096:
            raise ValueError("image_width and image_height must be 1..4096")
        object.__setattr__(self, "public_base_url", self.public_base_url.rstrip("/"))
