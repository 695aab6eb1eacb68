"""Running the simulator as its own process."""

from __future__ import annotations

import uvicorn

from app.simulator.app import create_simulator_app
from app.simulator.config import SimulatorConfig


def run_simulator(host: str, port: int, config: SimulatorConfig) -> None:
    """Serve the simulator with uvicorn until interrupted; shutdown stops its background work."""
    uvicorn.run(create_simulator_app(config), host=host, port=port, log_level="info")
