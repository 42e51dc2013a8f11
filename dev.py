#!/usr/bin/env python3
"""Set-up and entry point for the two README commands.

    python3 dev.py example   # set up .venv, run examples/lightning_digits.py on the embedded cluster
    python3 dev.py test      # set up .venv and the test services, run the whole test suite

Everything is installed in one pip resolver pass (torch pinned to the CPU build on this disk), and
skipped when pyproject.toml has not changed since the last install.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".gpu-proxy-installed"
TORCH_PIN = "torch==2.13.0"
APT_PACKAGES = ["openssh-server", "openssh-client", "rsync"]  # a real sshd on loopback; rsync for Ray's launcher


def _run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def ensure_venv() -> None:
    fingerprint = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH_PIN.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == fingerprint and PYTHON.exists():
        return
    if not PYTHON.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    _run([str(PYTHON), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    _run([str(PYTHON), "-m", "pip", "install", "-q", TORCH_PIN, "-e", f"{ROOT}[dev]"])
    STAMP.write_text(fingerprint)


def ensure_apt_packages() -> None:
    sshd = shutil.which("sshd") or Path("/usr/sbin/sshd").exists()
    if sshd and shutil.which("ssh") and shutil.which("rsync"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"note: install {' '.join(APT_PACKAGES)} to run the SSH tests; they are skipped without it")
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], env=env)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES], env=env)


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "help"
    if command == "example":
        ensure_venv()
        return subprocess.call([str(PYTHON), str(ROOT / "examples" / "lightning_digits.py"), *argv[1:]])
    if command == "test":
        ensure_venv()
        ensure_apt_packages()
        if not argv[1:]:  # the whole suite: the lint first (seconds), configured in pyproject.toml
            lint = subprocess.call([str(PYTHON), "-m", "ruff", "check", "."], cwd=ROOT)
            if lint != 0:
                print("error: ruff check found problems (fix them, or `ruff check --fix .`)", file=sys.stderr)
                return lint
        code = subprocess.call([str(PYTHON), "-m", "pytest", *argv[1:]], cwd=ROOT)
        if code == 5:  # pytest: no test was collected; an empty selection is not a pass
            print("error: no test was collected", file=sys.stderr)
            return 1
        return code
    print(__doc__)
    return 0 if command in ("help", "-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
