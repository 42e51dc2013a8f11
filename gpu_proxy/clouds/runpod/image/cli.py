"""``gpu-proxy image check IMAGE``: the node image's versions against this machine's, before pods are paid for."""
from __future__ import annotations

import argparse


def add_image_commands(subparsers: "argparse._SubParsersAction") -> None:
    image = subparsers.add_parser("image", help="node images for RunPod (cluster_image/Dockerfile)")
    commands = image.add_subparsers(dest="image_command", required=True)
    check = commands.add_parser(
        "check", help="compare an image's gpu-proxy, Ray, Python, torch/Lightning and Keras/TF versions with this "
                      "machine's (exit 0: same, 1: different, 3: not everything could be checked)")
    check.add_argument("image", help="e.g. ghcr.io/you/gpu-proxy-node:2.60")
    check.add_argument("--no-engine", action="store_true",
                       help="do not run the image with docker/podman here even if they have it")
    check.add_argument("--no-registry", action="store_true", help="do not read the image's labels from its registry")
    check.set_defaults(func=cmd_image_check)


def cmd_image_check(args: argparse.Namespace) -> int:
    from gpu_proxy.clouds.runpod.image.check import check_image

    report = check_image(args.image, engines=() if args.no_engine else ("docker", "podman"),
                         registry=not args.no_registry)
    print(report.text())
    return report.exit_code
