"""The node environment home gives each stock pod (gpu_proxy/clouds/runpod/bring_up.py), from the pods
as RunPod's API (the fake, checked against its OpenAPI document) answers for them."""
from __future__ import annotations

import time

import pytest

from gpu_proxy.clouds.runpod import CreatePodRequest, RunPodClient
from gpu_proxy.clouds.runpod.bring_up import node_environments
from gpu_proxy.clouds.runpod.client import CreateClusterRequest
from tests.fakes.runpod_api import FakeRunPod

KEY = {"PUBLIC_KEY": "ssh-ed25519 AAAA x"}
INSTANT = ("NODE_RANK", "NODE_ADDR", "MASTER_ADDR", "NUM_NODES")


@pytest.fixture(scope="module")
def fake():
    with FakeRunPod(provisioning_s=0.05, starting_s=0.05) as server:
        yield server
        assert server.violations == []


@pytest.fixture
def client(fake):
    client = RunPodClient(fake.api_key, base_url=fake.url, timeout_s=5, max_retries=3, sleep=lambda s: None)
    yield client
    for cluster in fake.live_clusters():
        client.delete_cluster(cluster.id)
    for pod in fake.live_pods():
        client.terminate_pod(pod.id)


def _until(read, ready, timeout_s: float = 10):
    deadline = time.monotonic() + timeout_s
    while not ready(value := read()):
        assert time.monotonic() < deadline, "the fake never got there"
        time.sleep(0.02)
    return value


def test_standalone_pods_get_their_own_env_without_the_key_and_nothing_of_a_cluster(client):
    pods = [client.create_pod(CreatePodRequest(f"gp-test-env{i}", "img:1", "NVIDIA RTX A4000", 1,
                                               env={**KEY, "ROLE": f"r{i}"})) for i in range(2)]
    pods = [_until(lambda pod=pod: client.get_pod(pod.id), lambda pod: pod.status == "RUNNING") for pod in pods]
    assert all(pod.cluster_id is None for pod in pods)  # RunPod omits a standalone pod's membership
    assert node_environments(pods) == [{"ROLE": "r0", "SSHD": "off"}, {"ROLE": "r1", "SSHD": "off"}]


def test_instant_cluster_members_get_the_rank_and_addresses_runpod_sets_in_their_containers(client, fake):
    cluster = client.create_cluster(CreateClusterRequest("gp-test-env-ic", "img:1", "NVIDIA RTX A4000", 1, 3,
                                                         env={**KEY, "ROLE": "node"}))
    pods = _until(lambda: client.cluster_pods(cluster.id),
                  lambda pods: len(pods) == 3 and all(p.status == "RUNNING" and p.cluster_rank is not None
                                                      for p in pods))
    envs = node_environments(pods)
    for pod, env in zip(pods, envs):
        container = fake.pods[pod.id].cluster_env  # what a stock image's ssh sessions do not get
        assert env == {"ROLE": "node", **{name: container[name] for name in INSTANT}, "SSHD": "off"}
    assert [env["NODE_RANK"] for env in envs] == ["0", "1", "2"]
    assert {env["MASTER_ADDR"] for env in envs} == {envs[0]["NODE_ADDR"]}  # rank 0 is the head
