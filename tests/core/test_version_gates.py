"""The version gates and the optional extras: a clear error at import, naming the range or the extra to install.

Versions outside a gate's range are given to the gate function (the installed libraries stay as they
are); the missing extra is a real import in a child process whose finders do not find ``ray.tune``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from gpu_proxy import version_gates
from gpu_proxy.version_gates import GATES, SKIP_ENV, UntestedVersionError

ROOT = Path(__file__).resolve().parents[2]

# A version on each side of every gate's range.
OUTSIDE = {"ray": ("2.59.2", "2.61.0"), "lightning": ("2.5.6", "2.7.0"), "pytorch_lightning": ("2.5.6", "2.7.0"),
           "torch": ("2.3.1", "2.14.0"), "keras": ("3.15.0", "3.16.0"), "tensorflow": ("2.20.0", "2.22.0rc1")}


@pytest.fixture(autouse=True)
def _no_skip(monkeypatch):
    monkeypatch.delenv(SKIP_ENV, raising=False)


def test_every_gate_has_versions_outside_it():
    assert set(OUTSIDE) == set(GATES)


@pytest.mark.parametrize("module", sorted(OUTSIDE))
def test_a_version_outside_the_range_fails_with_the_range_and_the_fix(module):
    gate = GATES[module]
    for version in OUTSIDE[module]:
        with pytest.raises(UntestedVersionError) as info:
            version_gates.check(module, version)
        message = str(info.value)
        assert f"tested with {gate.library} {gate.tested}; you have {gate.library} {version}" in message
        assert f'pip install "{gate.requirement}"' in message
        assert f"{SKIP_ENV}=1" in message
        assert isinstance(info.value, ImportError) and info.value.name == module


def test_the_message_names_the_private_parts_and_the_other_way_out():
    with pytest.raises(UntestedVersionError) as info:
        version_gates.check("lightning", "2.7.0", hint="or use num_workers=1")
    message = str(info.value)
    assert "gpu-proxy 0.1.0 was tested with Lightning 2.6.x; you have Lightning 2.7.0" in message
    assert "_Launcher" in message and "_fit_impl" in message
    assert 'pip install "lightning>=2.6,<2.7"; or use num_workers=1; or set' in message
    assert GATES["ray"].requirement == "ray[default]>=2.60,<2.61"


def test_versions_inside_the_range_pass():
    for module, version in [("ray", "2.60.0"), ("ray", "2.60.3"), ("lightning", "2.6.0"), ("torch", "2.13.0+cpu"),
                            ("keras", "3.15.1"), ("keras", "3.15.4"), ("tensorflow", "2.21.1")]:
        version_gates.check(module, version)
    assert not version_gates.in_range("keras", "not a version")


def test_the_installed_versions_pass():
    for module in GATES:
        version = version_gates.installed_version(module)
        assert version is not None, f"dev installs {module}"
        version_gates.check(module)


def test_a_library_not_installed_is_not_checked(monkeypatch):
    absent = dataclasses.replace(GATES["ray"], module="no_such_module", distributions=("no-such-distribution",))
    monkeypatch.setitem(GATES, "no_such_module", absent)
    assert version_gates.installed_version("no_such_module") is None
    version_gates.check("no_such_module")


def test_the_env_var_turns_the_failure_into_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(SKIP_ENV, "1")
    with caplog.at_level(logging.WARNING, logger=version_gates.__name__):
        version_gates.check("keras", "3.16.0")
    assert "you have Keras 3.16.0" in caplog.text and "untested version" in caplog.text
    monkeypatch.setenv(SKIP_ENV, "0")
    with pytest.raises(UntestedVersionError):
        version_gates.check("keras", "3.16.0")


def test_the_pins_of_pyproject_are_the_ranges_of_the_gates():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    by_distribution = {name: gate for gate in GATES.values() for name in gate.distributions}
    pinned = set()
    for text in requirements:
        requirement = Requirement(text)
        gate = by_distribution.get(requirement.name)
        if gate is not None:
            assert requirement.specifier == SpecifierSet(gate.supported), f"{text} vs the gate's {gate.supported}"
            pinned.add(gate.module)
    assert pinned == set(GATES)


# The child's finders do not find the modules named in BLOCKED, as if they were not installed.
_CHILD = textwrap.dedent("""
    import sys
    BLOCKED = ("ray.tune", "ray.train", "pandas", "pyarrow")

    class Hide:
        def __init__(self, inner):
            self.inner = inner
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find else None
        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]

    import dataclasses
    from gpu_proxy import version_gates
    tested = version_gates.GATES["lightning"]
    version_gates.GATES["lightning"] = dataclasses.replace(tested, supported="<1")  # what 2.7 would meet
    try:
        import gpu_proxy_lightning
    except version_gates.UntestedVersionError as error:
        print("GATE:", error)
    assert "lightning" not in sys.modules, "the gate runs before Lightning is imported"
    version_gates.GATES["lightning"] = tested

    import gpu_proxy_lightning  # without the tune extra: everything but Tune's helpers
    from gpu_proxy_lightning import RemoteStrategy
    try:
        from gpu_proxy_lightning import TuneReportCallback
    except version_gates.MissingExtraError as error:
        print("EXTRA:", error)
    assert not {"pandas", "pyarrow", "ray.tune"} & set(sys.modules)
""")


def test_the_gate_runs_at_import_and_a_missing_extra_names_it():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop(SKIP_ENV, None)
    result = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("GATE: gpu-proxy") and "you have Lightning 2.6" in line for line in lines), result.stdout
    extra = [line for line in lines if line.startswith("EXTRA:")]
    assert extra and "gpu_proxy_lightning.tune (Ray Tune sweeps) needs ray.tune" in extra[0], result.stdout
    assert 'pip install "gpu-proxy[tune]"' in extra[0]
