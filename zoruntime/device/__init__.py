"""Device backends: CPU (thread lanes), simulated (virtual clock); CUDA arrives in its own module."""

from .base import Backend
from .cpu import CPUBackend
from .simulated import SimulatedLane, SimulationDeadlock, VirtualClockLoop, simulated_lanes
from .threads import ThreadLane, thread_lanes

__all__ = [
    "Backend",
    "CPUBackend",
    "SimulatedLane",
    "SimulationDeadlock",
    "ThreadLane",
    "VirtualClockLoop",
    "simulated_lanes",
    "thread_lanes",
]
