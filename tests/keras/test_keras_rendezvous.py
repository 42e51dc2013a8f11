"""The Keras ranks' rendezvous takes part only of those holding the run's key, on loopback or the node's
address, and the key never enters the job's pickle."""
from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import numpy as np
import psutil
import pytest

from gpu_proxy import shipping
from gpu_proxy.secrets import Concealed
from gpu_proxy_keras import rendezvous
from gpu_proxy_keras.worker_job import KerasJob

pytestmark = pytest.mark.timeout(60)

KEY = rendezvous.new_key()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gather_in_threads(world_size: int, port: int, keys: dict[int, str]) -> dict[int, object]:
    got: dict[int, object] = {}

    def rank(r: int) -> None:
        try:
            got[r] = rendezvous.all_gather_addresses(r, world_size, f"host{r}:1", "127.0.0.1", port, keys.get(r, KEY))
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            got[r] = exc

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return got


def test_ranks_with_the_key_gather_every_address_in_rank_order():
    port = _free_port()
    got = _gather_in_threads(3, port, {})
    assert got == {r: ["host0:1", "host1:1", "host2:1"] for r in range(3)}


def test_a_client_without_the_key_is_dropped_and_gets_nothing():
    port = _free_port()
    intruder_saw: list[bytes] = []
    with rendezvous.Collector(port, "127.0.0.1", KEY) as collector:
        listening = [(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening == [("127.0.0.1", port)]

        def intruder() -> None:  # a well-formed message, signed with another key, claiming rank 1
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(rendezvous._signed_line(rendezvous.new_key(), "", {"rank": 1, "value": "evil",
                                                                                 "nonce": "x"}))
                conn.settimeout(5)
                try:
                    intruder_saw.append(conn.recv(100))
                except OSError:
                    intruder_saw.append(b"timeout")

        stranger = threading.Thread(target=intruder)
        stranger.start()
        while not [c for c in psutil.Process().net_connections("inet") if c.raddr and c.raddr.port == port]:
            pass  # the intruder is connected first: collect() meets it before the honest rank
        honest = threading.Thread(target=lambda: rendezvous.send_to_rank0(1, "good", "127.0.0.1", port, KEY))
        honest.start()
        assert collector.collect(1, timeout=10) == {1: "good"}
        honest.join(10)
        stranger.join(10)
    assert intruder_saw == [b""]  # closed on it, nothing sent back


def test_a_rank0_without_the_key_is_not_believed():
    port = _free_port()
    with rendezvous.Collector(port, "127.0.0.1", rendezvous.new_key()) as impostor:
        answers: list[object] = []

        def rank1() -> None:
            try:
                answers.append(rendezvous.send_to_rank0(1, "mine", "127.0.0.1", port, KEY,
                                                        wait_for_reply=True, timeout=10))
            except Exception as exc:  # noqa: BLE001
                answers.append(exc)

        thread = threading.Thread(target=rank1)
        thread.start()
        with pytest.raises(socket.timeout):
            impostor.collect(1, timeout=3)  # it cannot read rank 1's message as valid
        thread.join(15)
    assert len(answers) == 1 and isinstance(answers[0], ConnectionError)


def test_tensorflow_ports_are_free_on_every_interface_and_distinct_on_one_node():
    # TensorFlow's server binds every interface; a port held on loopback alone is not free for it.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        assert not rendezvous.is_free_everywhere(held.getsockname()[1])
    ports = [rendezvous.tensorflow_port(local_rank, 4) for local_rank in range(4)]
    assert [port % 4 for port in ports] == [(rendezvous.TENSORFLOW_PORTS.start + r) % 4 for r in range(4)]
    assert all(port in rendezvous.TENSORFLOW_PORTS and rendezvous.is_free_everywhere(port) for port in ports)


def test_rank0_listens_on_loopback_for_one_node_and_on_its_address_for_several():
    one = SimpleNamespace(num_nodes=1, master_addr="10.0.0.5")
    two = SimpleNamespace(num_nodes=2, master_addr="10.0.0.5")
    assert rendezvous.listen_address(one) == "127.0.0.1"
    assert rendezvous.listen_address(two) == "10.0.0.5"


def test_the_key_travels_beside_the_jobs_pickle_never_in_it():
    key = Concealed(rendezvous.new_key())
    job = KerasJob(method="fit", backend="tensorflow", model_archive=np.zeros(4, np.uint8),
                   user_objects=None, rendezvous_key=key)
    secrets: dict[str, str] = {}
    data = shipping.dumps(job, secrets=secrets)
    assert str.__str__(key).encode() not in data
    assert list(secrets.values()) == [str.__str__(key)]
    assert repr(key) == "'***'" and "***" in repr(job)
