"""A fit stopped from home (Ctrl-C, a cluster's stop) leaves the trained-so-far state in the local
model, as a local Keras fit interrupted by Ctrl-C does (its variables are trained in place)."""
from __future__ import annotations

import signal
import threading
import time

import keras
import numpy as np
import pytest

from gpu_proxy.errors import RunStoppedError
from gpu_proxy_keras import RemoteFit
from tests.keras_project.callbacks import RecordCalls, SlowEpochs
from tests.keras_project.models import blobs, mlp

pytestmark = [pytest.mark.timeout(300)]

FIT = dict(batch_size=16, epochs=20, shuffle=False, verbose=0)


class StopAfterFirstEpoch(keras.callbacks.Callback):
    """Runs at home: stops the run when epoch 0's end arrives, by the cluster's stop or by Ctrl-C."""

    def __init__(self, cluster=None) -> None:
        super().__init__()
        self.cluster = cluster

    def on_epoch_end(self, epoch, logs=None):
        if epoch != 0:
            return
        if self.cluster is None:
            raise KeyboardInterrupt  # what Ctrl-C raises on home's thread while it replays events
        for control in self.cluster.active_runs():
            control.request_stop("budget spent (test)")


def _check_trained_so_far(model, record):
    x, y = blobs(n=32)
    epochs = len(model.history.epoch)
    assert 1 <= epochs < FIT["epochs"]  # stopped early, after at least the epoch home saw
    assert int(model.optimizer.iterations.numpy()) == 2 * epochs  # 2 steps per epoch
    assert record.epochs == list(range(epochs)) and record.model is model  # callback state came too
    twin = mlp()
    twin.fit(x, y, **dict(FIT, epochs=epochs))
    for got, expected in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


class SigintAfterFirstEpoch(keras.callbacks.Callback):
    """Runs at home: a real Ctrl-C (SIGINT to this process) once epoch 0's end has arrived, from
    another thread, as a terminal sends it; notes when."""

    def __init__(self) -> None:
        super().__init__()
        self.sent_at: float | None = None

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            main = threading.main_thread().ident

            def press():  # as a terminal's Ctrl-C: to the main thread, which it wakes from a blocking wait
                self.sent_at = time.monotonic()
                signal.pthread_kill(main, signal.SIGINT)

            threading.Thread(target=press, daemon=True).start()


def _cluster(kind, request):
    if kind == "embedded":
        return request.getfixturevalue("local_cluster")
    from gpu_proxy import RayCluster

    head = request.getfixturevalue("ray_head")
    return RayCluster(head.dashboard_url, token=head.token)  # the run server of a cluster by address


@pytest.mark.parametrize("kind", ["embedded", "by_address"])
def test_a_real_ctrl_c_keeps_the_trained_so_far_state(kind, request):
    cluster = _cluster(kind, request)
    x, y = blobs(n=32)
    model, record, press = mlp(), RecordCalls(), SigintAfterFirstEpoch()
    remote = RemoteFit(model, cluster=cluster, home_callbacks=[press])
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            remote.fit(x, y, callbacks=[SlowEpochs(0.3), record], **FIT)
    finally:
        signal.signal(signal.SIGINT, previous)
    stopped_in = time.monotonic() - press.sent_at
    print(f"{kind}: Ctrl-C to fit() raising: {stopped_in:.2f} s")
    assert stopped_in < 10  # the next epoch end (0.3 s away), then rank 0's state home
    _check_trained_so_far(model, record)


def test_by_address_a_ctrl_c_whose_stop_takes_over_3_s_keeps_the_state(ray_head):
    # Ray's job supervisor kills a Job's driver 3 s after a stop; the run server has no such limit.
    from gpu_proxy import RayCluster

    x, y = blobs(n=32)
    model, record, press = mlp(), RecordCalls(), SigintAfterFirstEpoch()
    remote = RemoteFit(model, cluster=RayCluster(ray_head.dashboard_url, token=ray_head.token),
                       home_callbacks=[press])
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            remote.fit(x, y, callbacks=[SlowEpochs(4.0), record], **FIT)  # the next epoch end: 4 s away
    finally:
        signal.signal(signal.SIGINT, previous)
    _check_trained_so_far(model, record)


def test_a_stop_by_the_cluster_keeps_the_trained_so_far_state(local_cluster):
    x, y = blobs(n=32)
    model, record = mlp(), RecordCalls()
    remote = RemoteFit(model, cluster=local_cluster, home_callbacks=[StopAfterFirstEpoch(local_cluster)])
    with pytest.raises(RunStoppedError, match="budget spent"):
        remote.fit(x, y, callbacks=[SlowEpochs(0.3), record], **FIT)
    _check_trained_so_far(model, record)


def test_ctrl_c_at_home_keeps_the_trained_so_far_state(local_cluster):
    x, y = blobs(n=32)
    model, record = mlp(), RecordCalls()
    remote = RemoteFit(model, cluster=local_cluster, home_callbacks=[StopAfterFirstEpoch()])
    with pytest.raises(KeyboardInterrupt):
        remote.fit(x, y, callbacks=[SlowEpochs(0.3), record], **FIT)
    _check_trained_so_far(model, record)
