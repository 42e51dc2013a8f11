"""Runs: what executes on a cluster, the supervisor that drives it, and the two sides of a launch."""
from gpu_proxy.runs.home import execute, raise_for_outcomes, values
from gpu_proxy.runs.spec import RunSpec
from gpu_proxy.runs.worker import WorkerContext

__all__ = ["RunSpec", "WorkerContext", "execute", "raise_for_outcomes", "values"]
