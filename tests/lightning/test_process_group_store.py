"""A real 2-process gloo group started through ``process_group_store.serve``: every socket it listens on
is on loopback (one node) or on the node's own address (several nodes), never on every interface.

Unguarded (``mode="unguarded"``), the same group listens on ``[::]`` (rank 0's TCPStore): a 2-process
gloo group had 3 listeners, 1 on every interface; through serve() 3, all on loopback (one node) or
all on the node's address (several).  Binding the store's socket to "" makes both tests below fail."""
from __future__ import annotations

import ipaddress
import multiprocessing
import os
import socket
from types import SimpleNamespace

import psutil
import pytest

from gpu_proxy_lightning import process_group_store

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _public_address() -> str | None:
    """An address of this machine other than loopback: what Ray gives as the node's IP on a cluster."""
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family == socket.AF_INET and not ipaddress.ip_address(entry.address).is_loopback:
                return entry.address
    return None


def _rank(rank: int, mode: str, master_addr: str, port: int, ready: "multiprocessing.Queue",
          done: "multiprocessing.Event") -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR=master_addr, MASTER_PORT=str(port))
    ctx = SimpleNamespace(rank=rank, world_size=2, num_nodes=1 if mode == "single" else 2,
                          master_addr=master_addr, master_port=port)
    store = process_group_store.serve(ctx, node_address=master_addr) if mode != "unguarded" else None
    dist.init_process_group("gloo")  # env://, as Lightning's DDP calls it
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    ready.put((rank, os.getpid(), float(total)))
    done.wait(60)  # the test lists the listeners meanwhile
    dist.destroy_process_group()
    if store is not None:
        store.close()
        ready.put((rank, "env", os.environ.get("MASTER_ADDR"), os.environ.get("TORCHELASTIC_USE_AGENT_STORE")))


def _listeners_of_a_running_group(mode: str, master_addr: str) -> list[tuple[str, int]]:
    spawn = multiprocessing.get_context("spawn")
    ready, done, port = spawn.Queue(), spawn.Event(), _free_port()
    ranks = [spawn.Process(target=_rank, args=(rank, mode, master_addr, port, ready, done)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    try:
        joined = [ready.get(timeout=90) for _ in ranks]
        assert sorted(total for _, _, total in joined) == [3.0, 3.0]  # the group works
        pids = {pid for _, pid, _ in joined}
        listeners = [(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids]
        done.set()
        if mode != "unguarded":
            restored = [ready.get(timeout=30) for _ in ranks]
            assert {(addr, agent) for _, _, addr, agent in restored} == {(master_addr, None)}
    finally:
        done.set()
        for process in ranks:
            process.join(30)
            if process.is_alive():
                process.kill()
    assert [p.exitcode for p in ranks] == [0, 0]
    return listeners


def test_a_one_node_group_listens_on_loopback_only():
    # MASTER_ADDR is the node's address as Ray knows it; serve() keeps the group to loopback anyway.
    listeners = _listeners_of_a_running_group("single", _public_address() or "127.0.0.1")
    assert listeners, "the store and gloo's pairs listen somewhere"
    exposed = [(ip, port) for ip, port in listeners if not ipaddress.ip_address(ip).is_loopback]
    assert exposed == [], f"listening beyond loopback: {exposed}"


def test_a_multi_node_group_listens_on_the_nodes_address_only():
    address = _public_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    listeners = _listeners_of_a_running_group("multi", address)
    assert listeners and {ip for ip, _ in listeners} == {address}, listeners


def test_an_address_no_interface_holds_is_refused():
    with pytest.raises(RuntimeError, match="no network interface of this node has the address 192.0.2.7"):
        process_group_store.interface_of("192.0.2.7")
