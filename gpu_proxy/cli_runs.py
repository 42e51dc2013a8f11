"""``gpu-proxy runs|logs|attach|stop``: the commands about runs on a cluster (split from cli.py for size)."""
from __future__ import annotations

import argparse
import sys

from gpu_proxy.cli import _table, _time
from gpu_proxy.clusters import saved
from gpu_proxy.errors import GpuProxyError


def _existing(name: str) -> str:
    """Commands about runs must not launch a cluster: a bare provider name that is not saved is refused."""
    from gpu_proxy.clusters.providers import PROVIDERS, configured_clusters

    launches = name.startswith("ssh://") or name in PROVIDERS or name in configured_clusters()
    if launches and name not in ("local", "ray") and name not in saved.saved_clusters():
        raise SystemExit(f"gpu-proxy: -c {name!r} names a provider, which would launch a new cluster; give the "
                         f"name a cluster was saved under (`gpu-proxy status` lists them) or its dashboard URL")
    return name


def _is_missing_run(error: Exception) -> bool:
    text = str(error)
    return "404" in text or "does not exist" in text or "not found" in text.lower()


def _no_such_run(args: argparse.Namespace) -> int:
    """``no run X on cluster Y`` and the recent runs there, instead of Ray's 404 traceback."""
    from gpu_proxy.runs.attach import list_runs

    try:
        runs = list_runs(args.cluster)[-10:]
    except GpuProxyError as error:
        print(f"gpu-proxy: no run {args.run_id!r} on cluster {args.cluster!r}.", file=sys.stderr)
        print(f"(its runs could not be listed: {error})", file=sys.stderr)
        return 1
    served = next((r for r in runs if r.run_id == args.run_id), None)
    if served is not None:  # a run of the cluster's run server: its home followed it, nothing was kept
        print(f"gpu-proxy: run {args.run_id!r} ({served.status}) ran on cluster {args.cluster!r}'s run server for "
              "the home that followed it; its events were not kept. Only detached runs (detach=True) keep "
              "a log to attach to.", file=sys.stderr)
        return 1
    print(f"gpu-proxy: no run {args.run_id!r} on cluster {args.cluster!r}.", file=sys.stderr)
    if runs:
        print("Recent runs there:\n" + _table([[r.run_id, r.status, _time(r.start_time)] for r in runs],
                                              ["RUN", "STATE", "STARTED"]), file=sys.stderr)
    else:
        print("It has no gpu-proxy runs yet.", file=sys.stderr)
    return 1


def cmd_runs(args: argparse.Namespace) -> int:
    from gpu_proxy.runs.attach import list_runs

    runs = list_runs(_existing(args.cluster))
    print(_table([[r.run_id, r.status, _time(r.start_time), _time(r.end_time)] for r in runs],
                 ["RUN", "STATE", "STARTED", "ENDED"]))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from gpu_proxy import events
    from gpu_proxy.runs.attach import run_events

    try:
        found = run_events(args.run_id, _existing(args.cluster))
    except (RuntimeError, GpuProxyError) as error:
        if _is_missing_run(error):
            return _no_such_run(args)
        raise
    for event in found:
        if event.kind == events.LOG:
            print(f"(rank {event.rank}) {event.data.get('line', '')}")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    from gpu_proxy.runs.attach import attach

    try:
        attach(args.run_id, _existing(args.cluster))
    except (RuntimeError, GpuProxyError) as error:
        if _is_missing_run(error):
            return _no_such_run(args)
        raise
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop a run (its Ray Job); watching with `attach` and stopping are different commands."""
    from gpu_proxy.runs.attach import stop_run

    try:
        stopped = stop_run(args.run_id, _existing(args.cluster))
    except RuntimeError as error:
        if _is_missing_run(error):
            return _no_such_run(args)
        raise
    print(f"run {args.run_id!r} {'asked to stop' if stopped else 'had already ended'} on cluster {args.cluster!r}")
    return 0
