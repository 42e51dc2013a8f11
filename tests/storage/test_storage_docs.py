"""The examples in docs/checkpoints.md run as written."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_checkpoint_docs_examples_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "checkpoints.md").read_text(), re.S)
    assert len(blocks) >= 3
    script = tmp_path / "examples.py"
    # One process, in order: later examples may use what earlier ones made (memory:// is per process).
    script.write_text("\n\n".join(blocks))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unknown_protocol" in result.stdout
    assert "memory://runs/exp1/checkpoints/last.ckpt" in result.stdout
    assert "memory://runs/raw/weights.bin" in result.stdout
