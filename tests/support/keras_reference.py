"""Reference runs for the Keras tests, each in a fresh Python process (TF's devices and
distribution strategies are fixed once per process).

``fit_with_replicas`` trains a saved model on one process with ``replicas`` logical CPU devices under
``tf.distribute.MirroredStrategy``: the single-worker twin of a multi-worker run on the same global
batch. ``fit_multi_worker_unpatched`` runs plain Keras under MultiWorkerMirroredStrategy with
``workers`` local processes, without gpu_proxy's fix, to show the failure the fix exists for.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

_REPLICAS_SCRIPT = r"""
import json, sys
import numpy as np, tensorflow as tf
replicas = int(sys.argv[4])
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
import keras
import tests.keras_project.models  # registers the project's custom layer
strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
with strategy.scope():
    model = keras.saving.load_model(sys.argv[1])
data = np.load(sys.argv[2])
kwargs = json.loads(sys.argv[5])
held_out = kwargs.pop("validation_samples", 0)
if held_out:
    kwargs["validation_data"] = (data["x"][:held_out], data["y"][:held_out])
history = model.fit(data["x"], data["y"], verbose=0, **kwargs)
json.dump({"history": history.history, "replicas": strategy.num_replicas_in_sync}, open(sys.argv[3], "w"))
"""

_UNPATCHED_SCRIPT = r"""
import json, os, sys
os.environ["TF_CONFIG"] = sys.argv[4]
import numpy as np, tensorflow as tf, keras
import tests.keras_project.models  # registers the project's custom layer
strategy = tf.distribute.MultiWorkerMirroredStrategy()
with strategy.scope():
    model = keras.saving.load_model(sys.argv[1])
data = np.load(sys.argv[2])
try:
    model.fit(data["x"], data["y"], verbose=0, **json.loads(sys.argv[5]))
    outcome = "finished"
except Exception as exc:
    outcome = f"{type(exc).__name__}: {exc}"[:300]
json.dump({"outcome": outcome}, open(sys.argv[3], "w"))
os._exit(0)
"""


def _env() -> dict[str, str]:
    return dict(os.environ, KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
                PYTHONPATH=os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p))


def _save_inputs(folder: Path, model, x: np.ndarray, y: np.ndarray) -> tuple[str, str]:
    model_path, data_path = folder / "model.keras", folder / "data.npz"
    model.save(model_path)
    np.savez(data_path, x=x, y=y)
    return str(model_path), str(data_path)


def fit_with_replicas(folder: Path, model, x, y, replicas: int, **fit_kwargs) -> dict:
    """``fit_kwargs`` as for ``fit``; ``validation_samples=k`` validates on the first k samples."""
    model_path, data_path = _save_inputs(folder, model, x, y)
    out = folder / "replicas.json"
    subprocess.run([sys.executable, "-c", _REPLICAS_SCRIPT, model_path, data_path, str(out), str(replicas),
                    json.dumps(fit_kwargs)], env=_env(), check=True, timeout=300)
    return json.loads(out.read_text())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fit_multi_worker_unpatched(folder: Path, model, x, y, workers: int, **fit_kwargs) -> list[str]:
    model_path, data_path = _save_inputs(folder, model, x, y)
    addresses = [f"127.0.0.1:{_free_port()}" for _ in range(workers)]
    processes, outs = [], []
    for index in range(workers):
        config = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
        outs.append(folder / f"unpatched{index}.json")
        processes.append(subprocess.Popen(
            [sys.executable, "-c", _UNPATCHED_SCRIPT, model_path, data_path, str(outs[-1]), config,
             json.dumps(fit_kwargs)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        for process in processes:
            process.wait(timeout=300)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [json.loads(out.read_text())["outcome"] for out in outs]
