"""``gpu-proxy serverless deploy|health|purge``: manage the endpoint that RunPodServerless runs on.

The API key comes from ``$RUNPOD_API_KEY`` or ``~/.runpod/config.toml``; it is never printed.
"""
from __future__ import annotations

import argparse

from gpu_proxy.errors import ConfigurationError


def add_serverless_commands(subparsers: "argparse._SubParsersAction") -> None:
    """Add ``serverless`` (with ``deploy``, ``health``, ``purge``) to the CLI's subcommands."""
    serverless = subparsers.add_parser("serverless", help="RunPod serverless endpoints for RunPodServerless")
    commands = serverless.add_subparsers(dest="serverless_command", required=True)

    deploy = commands.add_parser("deploy", help="create or update an endpoint running the gpu-proxy handler")
    deploy.add_argument("--name", required=True, help="the endpoint's name (an existing one is updated)")
    deploy.add_argument("--image", required=True,
                        help="the serverless image, built from cluster_image/serverless/Dockerfile and pushed")
    deploy.add_argument("--gpu", action="append", required=True, metavar="POOL",
                        help="a serverless GPU pool id, e.g. ADA_24, AMPERE_80, HOPPER_141 (repeat for several; "
                             "the `pool` field of RunPod's GPU catalog)")
    deploy.add_argument("--gpu-count", type=int, default=1, help="GPUs per worker: one run's maximum (default 1)")
    deploy.add_argument("--workers-min", type=int, default=0, help="workers kept warm (default 0: pay only per run)")
    deploy.add_argument("--workers-max", type=int, default=1, help="runs at once (default 1)")
    deploy.add_argument("--idle-timeout", type=int, default=5, help="seconds an idle worker stays (default 5)")
    deploy.add_argument("--execution-timeout", type=int, default=3600,
                        help="seconds one run may take before RunPod stops it (default 3600)")
    deploy.add_argument("--disk", type=int, default=50, help="container disk in GB (default 50)")
    deploy.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="worker environment (repeat); for credentials use RunPod secrets: "
                             "AWS_SECRET_ACCESS_KEY={{ RUNPOD_SECRET_aws_secret }}")
    deploy.add_argument("--flashboot", action="store_true", help="turn on RunPod FlashBoot (faster cold starts)")
    deploy.set_defaults(func=cmd_deploy)

    for name, func, text in (("health", cmd_health, "jobs and workers of an endpoint by state"),
                             ("purge", cmd_purge, "remove the jobs waiting in an endpoint's queue")):
        command = commands.add_parser(name, help=text)
        command.add_argument("endpoint", help="the endpoint's id")
        command.set_defaults(func=func)


def _env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigurationError(f"--env {pair!r}: write NAME=VALUE.")
        env[name] = value
    return env


def cmd_deploy(args: argparse.Namespace) -> int:
    from gpu_proxy.clouds.runpod.client import RunPodClient
    from gpu_proxy.clouds.runpod.serverless.deploy import EndpointSettings, deploy

    settings = EndpointSettings(
        name=args.name, image=args.image, gpu_pools=tuple(args.gpu), gpu_count=args.gpu_count,
        workers_min=args.workers_min, workers_max=args.workers_max, idle_timeout_s=args.idle_timeout,
        execution_timeout_s=args.execution_timeout, disk_gb=args.disk, flashboot=args.flashboot,
        env=_env(args.env))
    endpoint, what = deploy(RunPodClient(), settings)
    print(f"endpoint {endpoint['name']!r} {what}: id {endpoint['id']}, {settings.gpu_count} GPU per worker "
          f"from {', '.join(settings.gpu_pools)}, up to {settings.workers_max} worker(s)")
    print(f"use it with: RunPodServerless({endpoint['id']!r}, gpus_per_worker={settings.gpu_count}, "
          "storage_url='s3://your-bucket/gpu-proxy')")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from gpu_proxy.clouds.runpod.serverless.endpoint_api import EndpointAPI

    health = EndpointAPI(args.endpoint).health()
    jobs, workers = health.get("jobs", {}), health.get("workers", {})
    print(f"endpoint {args.endpoint}")
    print("  jobs:    " + ", ".join(f"{k} {v}" for k, v in jobs.items()))
    print("  workers: " + ", ".join(f"{k} {v}" for k, v in workers.items()))
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from gpu_proxy.clouds.runpod.serverless.endpoint_api import EndpointAPI

    answer = EndpointAPI(args.endpoint).purge_queue()
    print(f"endpoint {args.endpoint}: {answer.get('removed', 0)} queued job(s) removed "
          f"(running jobs go on: cancel them from the console, or Ctrl-C where they were started)")
    return 0


__all__ = ["add_serverless_commands"]
