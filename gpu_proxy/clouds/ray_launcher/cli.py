"""``gpu-proxy up aws|gcp|azure``: a GPU cluster through Ray's cluster launcher, saved by name."""
from __future__ import annotations

import argparse
import sys

import yaml

from gpu_proxy.clusters import saved


def add_arguments(up: argparse.ArgumentParser) -> None:
    up.add_argument("--region", help="aws/gcp/azure: region (default us-east-1 / us-central1 / eastus)")
    up.add_argument("--zone", help="gcp/azure: availability zone")
    up.add_argument("--project-id", help="gcp: your GCP project id")
    up.add_argument("--resource-group", help="azure: resource group (default gpu-proxy-NAME)")
    up.add_argument("--instance-type", help="aws/gcp/azure: the cloud's instance type, instead of choosing it from --gpu")
    up.add_argument("--pip", action="append", help="aws/gcp/azure: what the nodes pip install instead of the Ray, "
                                                   "gpu-proxy and framework versions installed here (repeat); "
                                                   "runpod (no --image): one more requirement installed on the pods "
                                                   "besides home's versions, e.g. einops==0.8.1 (repeat)")
    up.add_argument("--dry-run", action="store_true", help="aws/gcp/azure: print the launcher config, launch nothing")


def up_launcher(args: argparse.Namespace, confirm) -> int:
    """Write the config, print the estimate, ask above --confirm-above, launch with Ray's launcher, save."""
    from gpu_proxy.clouds.ray_launcher.cluster import LauncherCluster

    gpus = args.gpu or []
    if args.kind == "onprem":
        gpus = ["-"]  # your machines' GPUs are what they are
    if len(gpus) > 1:
        raise SystemExit(f"gpu-proxy up {args.kind}: give one --gpu (several are a RunPod choice only)")
    if not gpus and not args.instance_type:
        raise SystemExit(f"gpu-proxy up {args.kind}: --gpu is required, e.g. --gpu A10G (or --instance-type)")
    if not args.dry_run and args.name in saved.saved_clusters():
        print(f"gpu-proxy up: a cluster named {args.name!r} is already saved; `gpu-proxy down {args.name}` first, "
              f"or pick another --name", file=sys.stderr)
        return 1
    state_dir = str(saved.state_folder("ray_launcher", args.name))  # created by start(), not by --dry-run
    common = dict(image=args.image, keep=True, name=f"gpu-proxy-{args.name}", state_dir=state_dir)
    if args.kind == "onprem":
        cluster = _onprem(args, common)
    else:
        cluster = LauncherCluster(args.kind, gpus[0] if gpus else None, args.gpus_per_node, args.nodes,
                                  region=args.region, zone=args.zone, project_id=args.project_id,
                                  resource_group=args.resource_group, instance_type=args.instance_type,
                                  pip_packages=args.pip, **common)
    print(f"estimated cost: {cluster.estimate()}", flush=True)
    if args.dry_run:
        print(yaml.safe_dump(cluster.config(), sort_keys=False), end="")
        print(f"(dry run: nothing launched; `ray up` of this config is what `gpu-proxy up {args.kind}` does)")
        return 0
    if not confirm(cluster.usd_per_hour):
        return 1
    cluster.start()
    try:
        state = cluster.saved_state()
        saved.save_cluster(args.name, state)
        resources = cluster.resources()
    except BaseException:
        cluster.stop()  # not saved: nothing would ever tear these machines down
        raise
    cluster.detach()
    print(f"cluster {args.name!r} is up: {state['nodes']} node(s), {resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs, ~${state['usd_per_hour']:.2f}/hour; "
          f"`gpu-proxy down {args.name}` tears it down")
    return 0


def _onprem(args: argparse.Namespace, common: dict):
    """Ray's on-prem (``local``) provider: machines you name, reached over SSH as ``--head``/``--worker``."""
    from gpu_proxy.clouds.ray_launcher.cluster import LauncherCluster
    from gpu_proxy.clusters.ray_node import RayPorts
    from gpu_proxy.ssh import SSHTarget

    if not args.head:
        raise SystemExit("gpu-proxy up onprem: --head user@host[:port] is required")
    head = SSHTarget.parse(args.head)
    workers = [SSHTarget.parse(w) for w in args.worker or []]
    options: list[str] = []
    ports = RayPorts()
    if args.free_ports:  # machines shared with other Ray clusters: free ports and a temp dir of its own
        ports = RayPorts.free_on_this_machine()
        options = [f for f in ports.flags("head") if not f.startswith(("--port=", "--dashboard-port="))]
        options.append(f"--temp-dir=/tmp/gp-{args.name}")
    return LauncherCluster("local", head_ip=head.host, worker_ips=[w.host for w in workers], ssh_user=head.user,
                           ssh_private_key=args.identity_file, ssh_port=head.port, ray_executable=args.ray_executable,
                           pip_packages=args.pip or (), ray_start_options=options,
                           gcs_port=ports.gcs or 6379, dashboard_port=ports.dashboard or 8265, **common)


def down_launcher(name: str, definition: dict) -> int:
    import os

    from gpu_proxy.clouds.ray_launcher.cluster import teardown

    if not os.path.exists(definition["config_file"]):
        print(f"gpu-proxy down: the launcher config of {name!r} ({definition['config_file']}) is gone; delete its "
              f"machines ({definition['name']}) in the {definition['cloud']} console", file=sys.stderr)
        return 1
    teardown(definition["config_file"], definition.get("state_dir"))  # needs no token: `ray down` by config
    saved.forget_cluster(name)
    print(f"cluster {name!r} torn down with Ray's cluster launcher ({definition['cloud']})")
    return 0
