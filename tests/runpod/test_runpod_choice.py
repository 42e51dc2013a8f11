"""Cost-aware choice on RunPod, against the fake REST API's live catalog (checked against RunPod's OpenAPI
document): the cheapest listed GPU type in stock now for the requested count, memory-class shorthands,
a clear refusal when none fits the price; and money limits and durations that must be finite (issue 20).
Nothing here launches a pod: every check happens before the first POST."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gpu_proxy.clouds.runpod import RunPodCluster
from gpu_proxy.clouds.runpod.cluster import parse_duration
from gpu_proxy.errors import ConfigurationError
from tests.fakes.runpod_api import FakeRunPod

IMAGE = "registry.example.com/gpu-proxy-node:test"


@pytest.fixture(scope="module")
def fake():
    with FakeRunPod() as server:
        yield server
        assert server.violations == []  # every request and answer matched RunPod's OpenAPI document


def pods(fake, gpu, gpus_per_node=1, nodes=1, **options) -> RunPodCluster:
    return RunPodCluster(gpu, gpus_per_node, nodes, image=IMAGE, api_key=fake.api_key, base_url=fake.url,
                         progress=lambda message: None, **options)


def posts(fake) -> int:
    return sum(method == "POST" for method, _, _ in fake.requests)


def test_the_cheapest_listed_type_in_stock_for_the_count_is_chosen(fake):
    before = posts(fake)
    one = pods(fake, ["H100 SXM", "A100 80GB"])
    assert one.check().gpu == one.gpu == "NVIDIA A100 80GB PCIe"  # $1.64 < $2.69, 4 in stock
    eight = pods(fake, ["H100 SXM", "A100 80GB"], gpus_per_node=8)
    assert eight.check().gpu == "NVIDIA H100 80GB HBM3"  # the A100s' data centre has only 4 free
    fake.set_stock("EU-RO-1", "NVIDIA A100 80GB PCIe", 0)
    try:
        assert pods(fake, "H100 SXM,A100 80GB").check().gpu == "NVIDIA H100 80GB HBM3"  # none left: the next
    finally:
        fake.set_stock("EU-RO-1", "NVIDIA A100 80GB PCIe", 4)
    assert posts(fake) == before


def test_a_memory_class_shorthand_takes_every_type_with_that_much_memory(fake):
    assert pods(fake, "any-80gb").check().gpu == "NVIDIA A100 80GB PCIe"
    chosen = pods(fake, "any-40gb", gpus_per_node=2).check()
    assert chosen.gpu == "NVIDIA L40S"  # 48 GB at $0.86 beats the 80 GB types; the 24 GB 4090 is excluded
    with pytest.raises(ConfigurationError, match="no GPU type with 200 GB or more"):
        pods(fake, "any-200gb").check()


def test_refused_when_none_fits_the_price_naming_the_cheapest_candidate(fake):
    before = posts(fake)
    with pytest.raises(ConfigurationError) as refused:
        pods(fake, ["H100 SXM", "A100 80GB"], gpus_per_node=2, max_usd_per_hour=3.0).check()
    message = str(refused.value)
    assert "max_usd_per_hour=3" in message and "'NVIDIA A100 80GB PCIe'" in message and "$3.28/hour" in message
    with pytest.raises(ConfigurationError, match=r"above max_usd_per_hour=2"):
        pods(fake, "H100 SXM", max_usd_per_hour=2).check()  # one type: the same limit holds
    with pytest.raises(ConfigurationError, match="None of 'NVIDIA H100 PCIe', 'NVIDIA L40S' is available on RunPod now "
                                                 "for 4 GPU"):
        pods(fake, ["H100 PCIe", "L40S"], gpus_per_node=4, max_usd_per_hour=100).check()
    assert pods(fake, ["H100 SXM", "A100 80GB"], gpus_per_node=2, max_usd_per_hour=3.3).check().per_hour == \
        pytest.approx(3.28)
    assert posts(fake) == before


@pytest.mark.parametrize("field", ["budget_usd", "max_usd_per_hour"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -5.0, 0])
def test_money_limits_must_be_finite_and_positive(fake, field, value):
    with pytest.raises(ConfigurationError, match=f"{field}=.* must be a finite positive number"):
        pods(fake, "H100 SXM", **{field: value})


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaNm", "infh", float("nan"), "0", "-1m", "ten"])
def test_durations_must_be_finite_and_positive(value):
    with pytest.raises(ConfigurationError, match="give a positive duration"):
        parse_duration(value)
    assert parse_duration("10m") == 600 and parse_duration(90) == 90


def test_the_cli_refuses_nan_budgets_and_takes_repeated_gpus(fake, tmp_path):
    env = dict(os.environ, GPU_PROXY_CONFIG_DIR=str(tmp_path), RUNPOD_API_KEY=fake.api_key, RUNPOD_REST_URL=fake.url,
               GPU_PROXY_RUNPOD_IMAGE=IMAGE)
    run = lambda *args: subprocess.run([sys.executable, "-m", "gpu_proxy.cli", "up", "runpod", *args],  # noqa: E731
                                       capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    for flag in ("--budget-usd", "--max-usd-per-hour"):
        done = run("--gpu", "H100 SXM", flag, "nan")
        assert done.returncode == 2 and "'nan' is not a finite positive number" in done.stderr
    before = posts(fake)
    done = run("--gpu", "H100 SXM", "--gpu", "A100 80GB", "--gpus-per-node", "4", "--confirm-above", "1")
    assert done.returncode == 1 and "4 x NVIDIA A100 80GB PCIe" in done.stdout and "pass --yes" in done.stderr
    done = run("--gpu", "any-80gb", "--max-usd-per-hour", "1")
    assert done.returncode == 1 and "cheapest available candidate, 'NVIDIA A100 80GB PCIe'" in done.stderr
    assert posts(fake) == before
