"""A user's home process that fits remotely until killed: ``python -m tests.keras_project.home_fit CLUSTER FOLDER``.

CLUSTER is "embedded" or a dashboard URL (token from RAY_AUTH_TOKEN_PATH). Rank 0 notes in FOLDER its
run name (``run``) and '<pid> <epoch>' as each epoch begins (``rank0.txt``), so a test can kill this
process mid-run and watch what the run does next.
"""
from __future__ import annotations

import os
import sys

import keras

from gpu_proxy_keras import RemoteFit
from tests.keras_project.callbacks import RecordEpochBegins, SlowEpochs
from tests.keras_project.models import blobs, mlp


class NoteRunName(keras.callbacks.Callback):
    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def on_train_begin(self, logs=None):
        with open(os.path.join(self.folder, "run"), "w") as file:
            file.write(os.environ["GPU_PROXY_RUN"])


def main(cluster: str, folder: str) -> None:
    x, y = blobs(n=32)
    remote = RemoteFit(mlp(), cluster=None if cluster == "embedded" else cluster, home_grace_s=6)
    remote.fit(x, y, batch_size=16, epochs=1000, verbose=0,
               callbacks=[NoteRunName(folder), RecordEpochBegins(folder), SlowEpochs(0.5)])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
