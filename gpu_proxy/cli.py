"""``gpu-proxy``: bring clusters up and down, see their state, and follow runs on them.

Exit codes: 0 success, 1 the operation failed (the message says why), 2 bad usage; `image check`: 3 when not
every version could be checked.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Sequence

from gpu_proxy.clusters import saved
from gpu_proxy.errors import GpuProxyError


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths))]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _time(seconds: float | None) -> str:
    return _dt.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S") if seconds else "-"


def cmd_up(args: argparse.Namespace) -> int:
    if args.kind == "ray":
        from gpu_proxy.clusters.ray_cluster import RayCluster

        if not args.address:
            raise SystemExit("gpu-proxy up ray: --address http://host:8265 is required")
        cluster = RayCluster(args.address)
        cluster.start()  # check it answers with our token before saving it
        saved.save_cluster(args.name, {"kind": "ray", "address": args.address})
        print(f"saved cluster {args.name!r}: {args.address}")
        return 0
    if args.kind == "local":
        from gpu_proxy.clusters.kept_local import start_kept_local

        print("starting a kept Ray cluster on this machine (loopback only)", flush=True)
        definition = start_kept_local(args.name, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
        saved.save_cluster(args.name, definition)
        print(f"cluster {args.name!r} is up at {definition['address']}: pass cluster={args.name!r}; "
              f"`gpu-proxy down {args.name}` stops it")
        return 0
    if args.kind == "ssh":
        from gpu_proxy.clusters.ray_node import RayPorts
        from gpu_proxy.clusters.ssh import SSHCluster

        if not args.head:
            raise SystemExit("gpu-proxy up ssh: --head user@host is required")
        cluster = SSHCluster(args.head, workers=args.worker or [], identity_file=args.identity_file,
                             known_hosts_file=args.known_hosts_file,
                             private_ip=args.private_ip, worker_private_ips=args.worker_private_ip or None,
                             ray_executable=args.ray_executable, keep_running=True,
                             head_ports=RayPorts.free_on_this_machine() if args.free_ports else None)
        print(f"starting Ray on {args.head}" + (f" and {len(args.worker)} worker(s)" if args.worker else ""),
              flush=True)
        cluster.start()
        state = cluster.saved_state()
        state.update(kind="ssh", token_file=saved.save_token(args.name, cluster.token or ""))
        saved.save_cluster(args.name, state)
        resources = cluster.resources()
        print(f"cluster {args.name!r} is up: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")
        return 0
    if args.kind == "runpod":
        return _up_runpod(args)
    if args.kind in ("aws", "gcp", "azure", "onprem"):
        from gpu_proxy.clouds.ray_launcher.cli import up_launcher

        return up_launcher(args, lambda per_hour: _confirm(args, per_hour))
    print(f"gpu-proxy up: cluster kind {args.kind!r} is not available in this version", file=sys.stderr)
    return 2


def _up_runpod(args: argparse.Namespace) -> int:
    """Launch RunPod pods, show the estimate, ask above a threshold, keep them and save the cluster."""
    from gpu_proxy.clouds.runpod import RunPodCluster
    from gpu_proxy.clusters.ray_node import RayPorts

    if not args.gpu:
        raise SystemExit("gpu-proxy up runpod: --gpu is required, e.g. --gpu H100 or --gpu 'NVIDIA H100 80GB HBM3'")
    if args.name in saved.saved_clusters():
        print(f"gpu-proxy up: a cluster named {args.name!r} is already saved; `gpu-proxy down {args.name}` first, "
              f"or pick another --name", file=sys.stderr)
        return 1
    from gpu_proxy.clouds.runpod.options import requirement_list

    state_dir = saved.state_folder("runpod", args.name)
    # --pip is defined with the launcher's options (gpu_proxy/clouds/ray_launcher/cli.py): for runpod, extras.
    requirements = [*(requirement_list(args.requirements) if args.requirements else ()), *(args.pip or ())]
    gpus = [part.strip() for value in args.gpu for part in value.split(",") if part.strip()]
    cluster = RunPodCluster(gpus if len(gpus) > 1 else gpus[0], args.gpus_per_node, args.nodes,
                            max_usd_per_hour=args.max_usd_per_hour, instant_cluster=args.instant_cluster,
                            idle_timeout=args.idle_timeout, budget_usd=args.budget_usd, keep=True, image=args.image,
                            cloud=args.cloud, data_centers=args.data_center or (), expected_hours=args.hours,
                            ray_ports=RayPorts.free_on_this_machine() if args.free_ports else None,
                            worker_ray_ports=RayPorts.free_on_this_machine() if args.free_ports else None,
                            state_dir=str(state_dir), requirements=requirements, pip_options=args.pip_option or ())
    estimate = cluster.check()
    print(f"estimated cost: {estimate}", flush=True)
    if not _confirm(args, estimate.per_hour):
        return 1
    cluster.start()
    try:
        state = cluster.saved_state()
        state["token_file"] = saved.save_token(args.name, cluster.token or "")
        saved.save_cluster(args.name, state)
        resources = cluster.resources()
    except BaseException:
        cluster.stop(raise_errors=False)  # not saved: nothing would ever terminate these pods
        raise
    cluster.detach()
    guards = [f"idle timeout {args.idle_timeout}" if args.idle_timeout else "no idle timeout",
              f"budget ${args.budget_usd:g}" if args.budget_usd else "no budget"]
    print(f"cluster {args.name!r} is up: {len(state['pod_ids'])} pod(s), {resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs, ${state['usd_per_hour']:.2f}/hour ({', '.join(guards)}); "
          f"`gpu-proxy down {args.name}` terminates it")
    return 0


def _confirm(args: argparse.Namespace, per_hour: float) -> bool:
    """Ask before launching above --confirm-above USD/hour; without a terminal, refuse unless --yes."""
    if args.yes or per_hour <= args.confirm_above:
        return True
    question = (f"This cluster costs ${per_hour:.2f}/hour, above --confirm-above "
                f"${args.confirm_above:g}/hour, until `gpu-proxy down {args.name}`")
    if not sys.stdin.isatty():
        print(f"gpu-proxy up: {question}. Not launching without confirmation: pass --yes (or raise "
              f"--confirm-above) to launch from a script.", file=sys.stderr)
        return False
    if input(f"{question}. Launch? [y/N] ").strip().lower() not in ("y", "yes"):
        print("not launched")
        return False
    return True


def _money(text: str) -> float:
    """argparse type of a money limit: finite and positive (``nan`` would never be reached)."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite positive number of US dollars, e.g. 50")
    return value


def _cost_text(cluster) -> str:
    cost = getattr(cluster, "cost", None)
    if cost is None:
        return "-"
    meter = cost()
    text = f"${meter['spent_usd']:.2f} (${meter['usd_per_hour']:.2f}/h"
    return text + (f", budget ${meter['budget_usd']:g})" if meter.get("budget_usd") else ")")


def _warm_text(cluster) -> str:
    """The cluster's warm workers, as its run server reports them: ``2 lightning idle 35s``, ..."""
    from gpu_proxy.clusters.base import JobsCluster
    from gpu_proxy.runs.server_client import ServerClient

    if not isinstance(cluster, JobsCluster):
        return "-"
    try:
        groups = ServerClient(cluster).request("status").get("pool", [])
    except (OSError, GpuProxyError) as exc:
        return f"? ({exc})"
    return ", ".join(f"{g['workers']} {g['kind']} {g['state']}" + (f" {g['idle_s']:.0f}s" if g["state"] == "idle" else "")
                     for g in groups) or "none"


def cmd_status(args: argparse.Namespace) -> int:
    from gpu_proxy.clusters.resolve import resolve_cluster

    names = [args.cluster] if args.cluster else sorted(saved.saved_clusters())
    if not names:
        print("no saved clusters; `gpu-proxy up ray --address URL --name NAME` saves one")
        return 0
    rows = []
    for name in names:
        try:
            cluster = resolve_cluster(name)
            cluster.start()
            resources = cluster.resources()
            rows.append([name, "up", f"{resources.get('CPU', 0):g}", f"{resources.get('GPU', 0):g}",
                         _cost_text(cluster), _warm_text(cluster), cluster.dashboard_url() or "-"])
            if getattr(cluster, "owns_nodes", False):
                cluster.stop()  # only this process's tunnel: the nodes keep running
        except GpuProxyError as exc:
            rows.append([name, "unreachable", "-", "-", "-", "-", str(exc).split(". ")[0]])
    print(_table(rows, ["CLUSTER", "STATE", "CPUS", "GPUS", "COST", "WARM WORKERS", "DASHBOARD"]))
    return 0 if all(row[1] == "up" for row in rows) else 1


def cmd_dashboard(args: argparse.Namespace) -> int:
    from gpu_proxy.clusters.base import SSHReachedCluster
    from gpu_proxy.clusters.resolve import resolve_cluster

    cluster = resolve_cluster(args.cluster)
    cluster.start()
    print(cluster.dashboard_url(), flush=True)
    # The URL answers only while this process holds the cluster open: it is the local end of an SSH tunnel
    # (every cluster reached over SSH), or the nodes end with this process (the embedded cluster).
    if cluster.owns_nodes or isinstance(cluster, SSHReachedCluster):
        print("(tunnel open; Ctrl-C closes it)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            cluster.stop()
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from gpu_proxy.clusters.resolve import resolve_cluster

    if args.cluster not in saved.saved_clusters():
        print(f"no saved cluster named {args.cluster!r}", file=sys.stderr)
        return 1
    definition = saved.saved_clusters()[args.cluster]
    if definition["kind"] == "ray_launcher":  # `ray down` through Ray's launcher, by its saved config
        from gpu_proxy.clouds.ray_launcher.cli import down_launcher

        return down_launcher(args.cluster, definition)
    if definition["kind"] == "runpod":  # needs no token: the pods are terminated by id
        from gpu_proxy.clouds.runpod.saved import SavedRunPodCluster

        SavedRunPodCluster(args.cluster, definition, token="").terminate()
        saved.forget_cluster(args.cluster)
        print(f"cluster {args.cluster!r} torn down: pod(s) {', '.join(definition['pod_ids'])} terminated")
        return 0
    cluster = resolve_cluster(args.cluster)
    _end_warm_workers(cluster)
    if definition["kind"] == "local":
        from gpu_proxy.clusters.kept_local import stop_kept_local

        stop_kept_local(definition)
        saved.forget_cluster(args.cluster)
        print(f"cluster {args.cluster!r} stopped")
        return 0
    if definition["kind"] == "ssh":
        from gpu_proxy.clusters.ssh import stop_saved_nodes

        stop_saved_nodes(definition)
        Path(definition["token_file"]).unlink(missing_ok=True)
    cluster.stop()  # an attached cluster (kind ray) is left running: only our tunnel/handles close
    saved.forget_cluster(args.cluster)
    print(f"cluster {args.cluster!r} {'torn down' if cluster.owns_nodes else 'forgotten (it was not started by gpu-proxy)'}")
    return 0


def _end_warm_workers(cluster) -> None:
    """Warm workers give their resources back (on a cluster we only forget, too: they are ours)."""
    from gpu_proxy.clusters.base import JobsCluster
    from gpu_proxy.runs.server_client import ServerClient

    if not isinstance(cluster, JobsCluster):
        return
    try:
        cluster.start()
        cleared = ServerClient(cluster).request("clear").get("cleared", 0)
    except (OSError, GpuProxyError) as exc:
        print(f"note: could not reach the cluster's run server to end its warm workers ({exc}); they end "
              "after their keep_warm time", file=sys.stderr)
        return
    if cleared:
        print(f"ended {cleared} group(s) of warm workers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu-proxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="bring a cluster up (or attach an existing one) and save it by name")
    up.add_argument("kind", choices=["local", "ray", "ssh", "runpod", "aws", "gcp", "azure", "onprem"],
                    help="local: a Ray cluster on this machine that outlives your scripts (warm workers for "
                         "script after script); ray: an existing Ray cluster by dashboard address; ssh: start Ray on your machines; "
                         "runpod: launch RunPod GPU pods (key from RUNPOD_API_KEY or ~/.runpod/config.toml); "
                         "aws/gcp/azure: GPU machines through Ray's cluster launcher (the cloud's own credentials); "
                         "onprem: Ray's launcher on machines you name (--head, --worker)")
    up.add_argument("--name", default="default", help="name to save the cluster under (default: default)")
    up.add_argument("--address", help="ray: the Ray dashboard URL, e.g. http://127.0.0.1:8265")
    up.add_argument("--head", help="ssh: user@host[:port] of the head machine")
    up.add_argument("--worker", action="append", help="ssh: user@host[:port] of a worker (repeat)")
    up.add_argument("--identity-file", help="ssh: your private key")
    up.add_argument("--known-hosts-file", help="ssh: known_hosts to check the machines' host keys against")
    up.add_argument("--private-ip", help="ssh: the head's private IP, where Ray listens")
    up.add_argument("--worker-private-ip", action="append", help="ssh: each worker's private IP (repeat)")
    up.add_argument("--ray-executable", default="ray", help="ssh: the `ray` command on the machines")
    up.add_argument("--free-ports", action="store_true",
                    help="ssh/runpod: nodes sharing a machine with other Ray clusters: pick free ports instead of "
                         "Ray's defaults (6379, 8265...)")
    up.add_argument("--gpu", action="append", help="GPU type, e.g. H100, 'RTX 4090', A10G; runpod: repeat it (or "
                                                   "a,b) or any-80gb for the cheapest available of several")
    up.add_argument("--max-usd-per-hour", type=_money, help="runpod: refuse above this list price per hour")
    up.add_argument("--num-cpus", type=int, help="local: CPUs Ray may use (default: all)")
    up.add_argument("--num-gpus", type=int, help="local: GPUs Ray may use (default: all)")
    up.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per pod / machine (default 1)")
    up.add_argument("--nodes", type=int, default=1,
                    help="runpod: pods (default 1); above 1 they share RunPod's global network")
    up.add_argument("--instant-cluster", action="store_true",
                    help="runpod: several nodes as one RunPod Instant Cluster (fast interconnect)")
    up.add_argument("--idle-timeout", help="runpod: pods end themselves after this long unused, e.g. 10m, 1h")
    up.add_argument("--budget-usd", type=_money, help="runpod: stop the run and terminate the pods before this spend")
    up.add_argument("--hours", type=float, help="runpod: expected hours, for the estimate")
    up.add_argument("--image", help="runpod: the node image (default $GPU_PROXY_RUNPOD_IMAGE); aws/gcp/azure: a "
                                    "Docker image with Python, Ray and gpu-proxy (default: pip install)")
    up.add_argument("--requirements", metavar="FILE",
                    help="runpod, no --image: a requirements.txt installed on each pod with home's versions")
    up.add_argument("--pip-option", action="append", metavar="OPTION",
                    help="runpod, no --image: an extra `pip install` argument, e.g. --pip-option=--index-url=URL")
    up.add_argument("--cloud", default="SECURE", choices=["SECURE", "COMMUNITY"], help="runpod: RunPod cloud")
    up.add_argument("--data-center", action="append", help="runpod: preferred data centre id (repeat)")
    up.add_argument("--confirm-above", type=float, default=5.0,
                    help="runpod: ask before launching a cluster above this many USD/hour (default 5)")
    up.add_argument("--yes", "-y", action="store_true", help="runpod: launch without asking")
    from gpu_proxy.clouds.ray_launcher.cli import add_arguments

    add_arguments(up)
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="resources and state of saved clusters")
    status.add_argument("cluster", nargs="?", help="a saved name or dashboard address (default: all saved)")
    status.set_defaults(func=cmd_status)

    dashboard = sub.add_parser("dashboard", help="print the URL of the cluster's Ray dashboard")
    dashboard.add_argument("cluster", help="a saved name or dashboard address")
    dashboard.set_defaults(func=cmd_dashboard)

    from gpu_proxy.cli_runs import cmd_attach, cmd_logs, cmd_runs, cmd_stop

    for name, func, text in (("runs", cmd_runs, "list the runs on a cluster"),):
        runs = sub.add_parser(name, help=text)
        runs.add_argument("--cluster", "-c", default="default", help="saved name or dashboard address")
        runs.set_defaults(func=func)
    for name, func, text in (("logs", cmd_logs, "print a run's logs"),
                             ("attach", cmd_attach, "replay a run's events and follow it live"),
                             ("stop", cmd_stop, "stop a run on a cluster")):
        command = sub.add_parser(name, help=text)
        command.add_argument("run_id")
        command.add_argument("--cluster", "-c", default="default", help="saved name or dashboard address")
        command.set_defaults(func=func)

    down = sub.add_parser("down", help="tear down a cluster gpu-proxy started, and forget it")
    down.add_argument("cluster", help="a saved name")
    down.set_defaults(func=cmd_down)
    from gpu_proxy.clouds.runpod.serverless.cli import add_serverless_commands

    add_serverless_commands(sub)
    from gpu_proxy.clouds.runpod.image.cli import add_image_commands

    add_image_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GpuProxyError as exc:
        print(f"gpu-proxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
