"""A process that starts and shuts down Ray several times (notebooks, pytest fixtures) still fits.

Runs in a subprocess: it must own its Ray clusters, and the suite's shared embedded cluster must
not be shut down under the other tests.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent('''
    import lightning as L, ray
    import gpu_proxy_lightning
    from gpu_proxy_lightning import RemoteStrategy
    from tests.lightning_project.models import DigitsData, DigitsModel

    def fit():
        trainer = L.Trainer(strategy=RemoteStrategy(num_workers=1), accelerator="cpu", max_epochs=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.fit(DigitsModel(), datamodule=DigitsData(limit=64))
        return trainer.global_step

    print("first", fit())
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False)  # the user's own cluster
    print("own", fit())
    ray.shutdown()
    print("again", fit())  # a new embedded cluster
''')


@pytest.mark.timeout(300)
def test_fits_after_ray_is_shut_down_and_started_again(tmp_path):
    script = tmp_path / "cycles.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=280,
                          cwd=Path(__file__).resolve().parents[2],
                          env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.split(" ")[0] in ("first", "own", "again")]
    assert [line.split()[0] for line in lines] == ["first", "own", "again"]
    assert all(int(line.split()[1]) > 0 for line in lines)
