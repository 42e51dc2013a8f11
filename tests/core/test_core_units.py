"""The core's small pieces, without a cluster: log codec, output capture, shipping, resource checks."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from gpu_proxy import ClusterResourceError, ConfigurationError, RemoteError, ShippingError, shipping
from gpu_proxy.clusters.resolve import resolve_cluster
from gpu_proxy.events import Event
from gpu_proxy.runs import log_codec
from gpu_proxy.runs.output_capture import last_state
from gpu_proxy.runs.resources import check_fits


def test_log_codec_round_trips_bytes_and_splits_long_events():
    big = bytes(range(256)) * 5000  # > MAX_LINE once base64-encoded
    events = [Event("log", {"line": "hi"}, rank=1, seq=0), Event("result", {"blob": big, "n": [1, 2]}, seq=1)]
    lines = [line for event in events for line in log_codec.encode(event)]
    assert len(lines) > 3 and all(len(line) < log_codec.MAX_LINE + 100 for line in lines)
    noise = ["Ray says hello", ""]
    decoder = log_codec.Decoder()
    decoded = [e for line in noise + lines for e in decoder.feed(line)]
    assert [e.seq for e in decoded] == [0, 1]
    assert decoded[1].data["blob"] == big and decoded[1].data["n"] == [1, 2]


def test_last_state_collapses_carriage_returns():
    assert last_state("10%\r50%\r100%") == "100%"
    assert last_state("plain") == "plain"
    assert last_state("done\r   \r") == "done"


def test_output_capture_sees_print_logging_and_c_level_writes():
    script = textwrap.dedent('''
        import logging, os, sys
        logging.basicConfig(stream=sys.stderr)
        from gpu_proxy.runs.output_capture import OutputCapture
        lines = []
        with OutputCapture(lambda stream, line: lines.append((stream, line))):
            print("from print")
            logging.getLogger("x").warning("from logging")
            os.write(1, b"from the fd\\n")
            print("a\\rb\\rc")
            sys.stdout.write("no newline at the end")
        print("AFTER", lines)
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    captured = eval(done.stdout.split("AFTER", 1)[1])  # noqa: S307 - our own repr
    assert ("stdout", "from print") in captured and ("stdout", "from the fd") in captured
    assert ("stderr", "WARNING:x:from logging") in captured
    assert ("stdout", "c") in captured and ("stdout", "no newline at the end") in captured
    assert "from print" in done.stdout  # still written to the original stream


class Holder:
    def __init__(self):
        self.inner = {"ok": 1, "lock": threading.Lock()}


def test_unpicklable_objects_are_named_by_path():
    with pytest.raises(ShippingError, match=r"payload\.inner\['lock'\] \(a lock\)"):
        shipping.dumps(Holder(), what="payload")


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def test_exceptions_travel_as_themselves_or_as_remote_error():
    try:
        raise ValueError("bad value")
    except ValueError as exc:
        packed = shipping.pack_exception(exc)
    rebuilt = shipping.unpack_exception(packed, "rank 3")
    assert isinstance(rebuilt, ValueError) and "bad value" in str(rebuilt) and "Remote traceback (rank 3)" in str(rebuilt)
    packed = shipping.pack_exception(NeedsTwoArgs(1, 2))
    assert packed["pickled"] is None  # it cannot be rebuilt from its args
    assert isinstance(shipping.unpack_exception(packed, "rank 0"), RemoteError)


def test_resource_check_names_what_the_cluster_has():
    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}]
    check_fits(4, {"CPU": 1, "GPU": 1}, nodes)
    with pytest.raises(ClusterResourceError, match=r"8 workers .*= 8 CPU, 8 GPU.* has 16 CPU, 4 GPU"):
        check_fits(8, {"CPU": 1, "GPU": 1}, nodes)
    with pytest.raises(ClusterResourceError, match="No single node"):
        check_fits(1, {"CPU": 1, "GPU": 4}, nodes)


def test_cluster_specs_that_cannot_work_are_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_PROXY_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ConfigurationError, match="Ray Client"):
        resolve_cluster("ray://head:10001")
    with pytest.raises(ConfigurationError, match="is not a provider, a configured cluster or a saved one"):
        resolve_cluster("my-lab")
    with pytest.raises(ConfigurationError, match="is a int"):
        resolve_cluster(3)  # type: ignore[arg-type]


def test_endpoint_never_pickles_its_token():
    import pickle

    from gpu_proxy import Endpoint

    endpoint = Endpoint("http://127.0.0.1:8265", "secret-token")
    assert "secret-token" not in repr(endpoint)
    with pytest.raises(TypeError, match="secret"):
        pickle.dumps(endpoint)


def test_import_gpu_proxy_loads_no_cloud_until_one_is_used():
    """issue 19: RunPod's client, serverless and Ray's launcher load on first use, not on import."""
    import subprocess
    import sys

    code = ("import sys, gpu_proxy\n"
            "print(sorted(m for m in sys.modules if m.startswith(('gpu_proxy.clouds', 'runpod'))))\n"
            "gpu_proxy.RunPodCluster\n"
            "print('gpu_proxy.clouds.runpod' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split("\n")[:2] == ["[]", "True"], done.stdout
