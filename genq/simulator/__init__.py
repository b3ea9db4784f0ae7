"""A local, fault-injecting implementation of the upstream generation API (see `simulator.app`)."""

from genq.simulator.app import build_app
from genq.simulator.config import Duration, SimConfig
from genq.simulator.process import SimulatorProcess, start_simulator

__all__ = ["Duration", "SimConfig", "SimulatorProcess", "build_app", "start_simulator"]
