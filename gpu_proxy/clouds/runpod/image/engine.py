"""Run the version probe inside an image with a container engine here (``docker`` or ``podman``).

Only an image the engine already has: ``--pull=never`` (checking must not download gigabytes), no
network, the image's own ``python3``. This reads what is really installed, so it works for any image
(a stock one, your own), not only those built from ``cluster_image/Dockerfile``.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field

from gpu_proxy.versions import PROBE_SCRIPT

ENGINES = ("docker", "podman")
_FIND_PYTHON = 'py="$(command -v python3 || command -v python)" || { echo "no python in the image" >&2; exit 3; }; exec "$py" -'


@dataclass
class EngineResult:
    """What one engine found: ``labels`` when it has the image; ``versions`` when the probe ran in it."""

    engine: str
    labels: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] | None = None
    problem: str = ""  # why versions is None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def probe_with_engine(image: str, engines: tuple[str, ...] = ENGINES,
                      timeout_s: float = 120.0) -> tuple[EngineResult | None, list[str]]:
    """The first engine here that has ``image`` locally, with the probe's versions; and why the others did not."""
    tried = []
    for engine in engines:
        program = shutil.which(engine)
        if program is None:
            continue
        try:
            inspect = subprocess.run([program, "image", "inspect", "--format", "{{json .Config.Labels}}", image],
                                     capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            tried.append(f"{engine}: `{engine} image inspect` did not answer within 30 s")
            continue
        if inspect.returncode != 0:  # no daemon, or the image is not here (and is not pulled)
            tried.append(f"{engine}: {_first_line(inspect.stderr or inspect.stdout)}")
            continue
        result = EngineResult(engine, labels=dict(json.loads(inspect.stdout.strip() or "null") or {}))
        command = [program, "run", "--rm", "-i", "--pull=never", "--network=none", "--entrypoint", "sh", image,
                   "-c", _FIND_PYTHON]
        try:
            run = subprocess.run(command, input=PROBE_SCRIPT, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            result.problem = f"`{engine} run` of the probe did not end within {timeout_s:.0f} s"
            return result, tried
        try:
            result.versions = json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else None
        except (ValueError, IndexError):
            result.versions = None
        if result.versions is None:
            result.problem = f"the probe did not run in the image ({_first_line(run.stderr or run.stdout)})"
        else:
            result.versions.pop("python_executable", None)
        return result, tried
    return None, tried or ["no docker or podman on this machine"]
