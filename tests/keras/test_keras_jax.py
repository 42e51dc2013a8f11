"""Several JAX workers through keras.distribution: the History of one process with as many devices.

The test process runs Keras on TensorFlow, so the JAX user's script runs in processes of its own
(tests/keras_project/jax_fit.py); the remote one starts its own embedded cluster.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpu_proxy.errors import ConfigurationError
from gpu_proxy_keras import arguments, jax_distribution

pytest.importorskip("jax")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def run_script(mode: str, **env: str) -> dict:
    completed = subprocess.run([sys.executable, "-m", "tests.keras_project.jax_fit", mode], cwd=ROOT,
                               env={**os.environ, "KERAS_BACKEND": "jax", **env}, capture_output=True,
                               text=True, timeout=400)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(600)
def test_two_jax_workers_give_the_history_of_one_process_with_two_devices():
    reference = run_script("reference", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    remote = run_script("remote")
    assert remote["epoch"] == reference["epoch"] == [0, 1, 2]
    assert set(remote["history"]) == set(reference["history"]) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    for key, values in reference["history"].items():
        np.testing.assert_allclose(remote["history"][key], values, rtol=0, atol=1e-5, err_msg=key)
    # 48 training samples in global batches of 16: 3 steps an epoch, as locally, not 3 per worker.
    assert remote["iterations"] == reference["iterations"] == 9
    for got, expected in zip(remote["weights"], reference["weights"]):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_each_rank_gets_its_part_of_every_global_batch():
    x = np.arange(20)
    parts = [jax_distribution.local_batches(x, 8, rank, 2) for rank in (0, 1)]
    assert parts[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17]
    assert parts[1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 18, 19]
    data, kwargs = jax_distribution.local_fit_arguments(
        {"x": x, "y": x * 10}, {"batch_size": 8, "validation_split": 0.2}, 1, 2)
    assert data["x"].tolist() == [4, 5, 6, 7, 12, 13, 14, 15] and data["y"].tolist() == [40, 50, 60, 70, 120, 130, 140, 150]
    assert [part.tolist() for part in data["validation_data"]] == [[18, 19], [180, 190]]
    assert kwargs["batch_size"] == 4 and kwargs["validation_split"] == 0.0
    data, _ = jax_distribution.local_fit_arguments(
        {"x": x, "sample_weight": x / 10}, {"batch_size": 8, "validation_split": 0.2}, 0, 2)
    x_val, y_val, weights_val = data["validation_data"]  # weights stay third, never read as y
    assert x_val.tolist() == [16, 17] and y_val is None and weights_val.tolist() == [1.6, 1.7]


def test_batches_that_do_not_split_evenly_are_refused_at_home():
    x = np.zeros((30, 4), "float32")
    with pytest.raises(ConfigurationError, match="batch_size=15 .* divisible by 2"):
        arguments.check_jax_fit({"x": x}, {"batch_size": 15}, 2, None)
    with pytest.raises(ConfigurationError, match="30 samples in batches of 8 end with a batch of 6"):
        arguments.check_jax_fit({"x": x}, {"batch_size": 8}, 4, None)
    with pytest.raises(ConfigurationError, match="needs arrays or .npy/.npz URLs"):
        arguments.check_jax_fit({"x": lambda: None}, {"batch_size": 8}, 2, None)
    arguments.check_jax_fit({"x": x, "validation_data": (x[:8], x[:8])}, {"batch_size": 10}, 2, None)
