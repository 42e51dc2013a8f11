"""The restart loop and the worker-resources helper both frameworks share, without a cluster.

A killed worker restarting a real Lightning or Keras fit: tests/lightning/test_lightning_checkpoints.py,
tests/keras/test_keras_checkpoints.py and tests/keras/test_keras_restarts.py.
"""
from __future__ import annotations

import pytest

from gpu_proxy.errors import WorkerLostError
from gpu_proxy.runs.resources import per_worker_resources
from gpu_proxy.runs.restarts import Attempt, run_with_restarts


def losing(times: int, seen: list[Attempt]):
    """A run whose first ``times`` attempts lose a worker, then return the attempt's checkpoint."""
    def run(attempt: Attempt) -> str:
        seen.append(attempt)
        if attempt.number <= times:
            raise WorkerLostError(f"worker lost in attempt {attempt.number}")
        return f"done from {attempt.resume_from}"
    return run


def test_each_restart_resumes_from_the_newest_checkpoint_after_announcing_it():
    seen: list[Attempt] = []
    announced: list[Attempt] = []
    checkpoints = iter(["epoch-1", "epoch-3"])
    result = run_with_restarts(losing(2, seen), 2, lambda: next(checkpoints), announced.append,
                               resume_from="given")
    assert result == "done from epoch-3"
    assert [(a.number, a.of, a.resume_from, a.after) for a in seen] == [
        (1, 3, "given", None), (2, 3, "epoch-1", "worker lost in attempt 1"),
        (3, 3, "epoch-3", "worker lost in attempt 2")]
    assert announced == seen[1:]


def test_without_checkpoints_a_restart_starts_from_the_beginning():
    seen: list[Attempt] = []
    assert run_with_restarts(losing(1, seen), 1, None, lambda attempt: None) == "done from None"
    assert [a.resume_from for a in seen] == [None, None]


def test_max_failures_zero_raises_the_loss_itself():
    with pytest.raises(WorkerLostError, match="^worker lost in attempt 1$") as info:
        run_with_restarts(losing(1, []), 0, lambda: "ckpt", lambda attempt: pytest.fail("no restart"))
    assert info.value.__cause__ is None


def test_more_failures_than_allowed_lists_each_one():
    announced: list[Attempt] = []
    with pytest.raises(WorkerLostError) as info:
        run_with_restarts(losing(5, []), 2, lambda: "ckpt", announced.append)
    assert str(info.value) == ("The run failed 3 times, more than max_failures=2:\n"
                               "  1. worker lost in attempt 1\n  2. worker lost in attempt 2\n"
                               "  3. worker lost in attempt 3")
    assert isinstance(info.value.__cause__, WorkerLostError) and [a.number for a in announced] == [2, 3]


def test_only_a_lost_worker_restarts():
    def fails(attempt: Attempt) -> None:
        raise ValueError("the user's bug")

    with pytest.raises(ValueError, match="the user's bug"):
        run_with_restarts(fails, 3, lambda: "ckpt", lambda attempt: pytest.fail("no restart"))


@pytest.mark.parametrize("given, gpu, expected", [
    (None, False, {"CPU": 1.0}),
    (None, True, {"CPU": 1.0, "GPU": 1.0}),
    ({"CPU": 4}, True, {"CPU": 4, "GPU": 1.0}),
    ({"CPU": 2, "GPU": 0.5}, True, {"CPU": 2, "GPU": 0.5}),
    ({"CPU": 2, "GPU": 0}, True, {"CPU": 2, "GPU": 0}),  # an explicit amount is the user's
    ({"CPU": 2, "GPU": 2}, False, {"CPU": 2, "GPU": 2}),  # contradictions are each framework's to refuse
])
def test_worker_resources(given, gpu, expected):
    resources = per_worker_resources(given, gpu)
    assert resources == expected
    if given is not None:
        assert resources is not given  # the user's dict is never changed
