"""A local, fault-injecting implementation of the upstream generation API (see `simulator.app`)."""

from simulator.app import build_app
from simulator.config import Duration, SimConfig
from simulator.process import SimulatorProcess, start_simulator

__all__ = ["Duration", "SimConfig", "SimulatorProcess", "build_app", "start_simulator"]
