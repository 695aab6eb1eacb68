"""A StarMagic stand-in: submit, query, cancel, callbacks with the real retry policy, image
links, faults.

It speaks the provider's published API by default: three models with their own
rules (``app.simulator.models``), the bare task object in query answers and
callbacks (``app.simulator.payloads``; the enveloped shapes stay available),
PNGs of the size each request implies, ``n`` images on gpt-image-2.

Run alone with ``run_simulator(host, port, config)``, or mount
``create_simulator_app(config)`` under a prefix (and set
``config.public_base_url`` to that origin plus prefix). Mounted, its lifespan
does not run: background work starts lazily, and the parent's lifespan should
``await sim_app.state.simulator.aclose()`` at shutdown. Per-task faults come
from ``[sim:…]`` prompt directives (grammar in ``app.simulator.faults``);
test controls live under ``/_sim`` (see ``app.simulator.control``).
"""

from app.simulator.app import create_simulator_app
from app.simulator.config import SimulatorConfig
from app.simulator.faults import Fault, FaultError, fault_from_mapping, parse_prompt
from app.simulator.server import run_simulator
from app.simulator.state import CallbackAttempt, SimulatorState

__all__ = [
    "CallbackAttempt",
    "Fault",
    "FaultError",
    "SimulatorConfig",
    "SimulatorState",
    "create_simulator_app",
    "fault_from_mapping",
    "parse_prompt",
    "run_simulator",
]
