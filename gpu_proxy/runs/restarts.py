"""Restarting a run whose worker was lost, from the newest committed checkpoint, up to ``max_failures`` times.

One loop for every framework: the Lightning launcher and Keras' ``RemoteFit`` each say how to run
one attempt from a checkpoint and how to tell the user that a restart begins; this module counts
the failures, picks the checkpoint the next attempt resumes from, and words the error once there
were more failures than ``max_failures``. Only a lost worker (:class:`WorkerLostError`: a killed
process, a dead node) restarts; any other error is the user's code failing and is raised as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from gpu_proxy.errors import WorkerLostError

Checkpoint = TypeVar("Checkpoint")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Attempt(Generic[Checkpoint]):
    """One try at the run: number 1 is the first, number 2 the first restart."""

    number: int
    of: int  # max_failures + 1: the most attempts the run may take
    resume_from: Checkpoint | None  # a restart: the newest committed checkpoint (None: there is none yet)
    after: str | None = None  # a restart: the lost worker's error that ended the attempt before


def run_with_restarts(run: Callable[[Attempt[Checkpoint]], Result], max_failures: int,
                      newest_checkpoint: Callable[[], Checkpoint | None] | None,
                      announce: Callable[[Attempt[Checkpoint]], None],
                      resume_from: Checkpoint | None = None) -> Result:
    """``run(attempt)`` until it returns.

    Each :class:`WorkerLostError` it raises starts the next attempt from ``newest_checkpoint()``
    (None when the run keeps no checkpoints), after ``announce(attempt)``. With ``max_failures=0``
    the first loss is raised as it is; past ``max_failures`` restarts a new ``WorkerLostError``
    lists every failure, numbered. ``resume_from`` is what the first attempt starts from.
    """
    failures: list[str] = []
    attempt: Attempt[Checkpoint] = Attempt(1, max_failures + 1, resume_from)
    while True:
        try:
            return run(attempt)
        except WorkerLostError as lost:
            failures.append(str(lost))
            if len(failures) > max_failures:
                if not max_failures:
                    raise
                listing = "\n".join(f"  {i + 1}. {text}" for i, text in enumerate(failures))
                raise WorkerLostError(f"The run failed {len(failures)} times, more than max_failures="
                                      f"{max_failures}:\n{listing}") from lost
            checkpoint = newest_checkpoint() if newest_checkpoint is not None else None
            attempt = Attempt(len(failures) + 1, max_failures + 1, checkpoint, str(lost))
            announce(attempt)
