"""How a sweep splits a metered cluster's spend among its trials (gpu_proxy/sweep_cost.py)."""
from __future__ import annotations

import pytest

from gpu_proxy.sweep_cost import CostLedger


class Meter:
    """A cluster's cost(): the spend is whatever the test sets."""

    def __init__(self) -> None:
        self.spent, self.budget, self.budget_exceeded = 0.0, None, False

    def cost(self) -> dict:
        return {"spent_usd": self.spent, "usd_per_hour": 1.0, "budget_usd": self.budget}


def test_spend_is_split_evenly_among_the_trials_running_while_it_accrued():
    meter = Meter()
    meter.spent = 5.0  # before the sweep: not its
    ledger = CostLedger(meter)
    ledger.sample()
    meter.spent = 6.0  # no trial runs: the sweep's only
    ledger.trial_started(0)
    meter.spent = 7.0  # trial 0 alone
    ledger.trial_started(1)
    meter.spent = 9.0  # both
    assert ledger.trial_ended(0) == pytest.approx(2.0)
    meter.spent = 10.0  # trial 1 alone
    assert ledger.trial_ended(1) == pytest.approx(2.0)
    assert ledger.total() == pytest.approx(5.0)


def test_the_budget_is_spent_when_the_cluster_says_so_or_the_spend_reaches_it():
    meter = Meter()
    ledger = CostLedger(meter)
    assert not ledger.budget_spent()
    meter.budget, meter.spent = 3.0, 2.0
    assert not ledger.budget_spent()
    meter.spent = 3.0
    assert ledger.budget_spent()
    meter.spent, meter.budget_exceeded = 0.0, True
    assert ledger.budget_spent()


def test_a_cluster_that_does_not_meter_has_no_cost():
    ledger = CostLedger(object())
    ledger.trial_started(0)
    assert ledger.trial_ended(0) is None and ledger.total() is None and not ledger.budget_spent()


def test_a_cost_that_cannot_be_read_yet_counts_from_the_first_reading():
    class NotStarted(Meter):
        def cost(self) -> dict:
            if self.spent < 100:
                raise RuntimeError("not started")
            return super().cost()

    meter = NotStarted()
    ledger = CostLedger(meter)
    ledger.trial_started(0)
    meter.spent = 120.0  # started: spend from before it (a saved cluster's) is not this sweep's
    ledger.sample()
    meter.spent = 121.0
    assert ledger.trial_ended(0) == pytest.approx(1.0) and ledger.total() == pytest.approx(1.0)


def test_optimize_wants_the_cluster_object_the_trials_use_not_a_name():
    import optuna

    from gpu_proxy.errors import ConfigurationError
    from gpu_proxy.sweeps import optimize

    with pytest.raises(ConfigurationError, match="resolve_cluster"):
        optimize(optuna.create_study(), lambda trial: 0.0, n_trials=1, cluster="my-runpod")
