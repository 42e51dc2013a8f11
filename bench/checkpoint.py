"""Checkpoint cost to S3: gpu-proxy's background commit against a raw `s3fs.put` of the same bytes.

    .venv/bin/python bench/checkpoint.py              # ~1 GiB state (needs ~4 GiB RAM, ~5 GiB disk)
    .venv/bin/python bench/checkpoint.py --size-mb 64 --rounds 2

The S3 endpoint is a moto server on 127.0.0.1 in its own process. Each round, side by side:

- reference: the state already serialised to a local file, uploaded with `s3fs.put_file`;
- ours: `AsyncFsspecCheckpointIO.save_checkpoint(state, url)` (what a Lightning step loop calls),
  then `wait()` until the checkpoint is committed.

Printed, as medians over the rounds:
- commit ratio: (save returned -> committed) / reference. Target <= 1.15.
- blocked fraction: time save_checkpoint held the caller / reference. Target <= 10 %.
- end-to-end ratio: (save called -> committed) / reference, for information.
Also the best-of-rounds commit ratio (fastest ours / fastest reference) and the spread of the
reference: on a shared machine other processes slow single rounds down by tens of percent, and
the fastest round of each is the one least disturbed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fsspec  # noqa: E402
import torch  # noqa: E402

from gpu_proxy.storage import latest_committed, remove_committed  # noqa: E402
from gpu_proxy_lightning.checkpoint_io import AsyncFsspecCheckpointIO  # noqa: E402
from tests.support.moto_s3 import start_moto_server, stop_process  # noqa: E402

COMMIT_TARGET = 1.15
BLOCKED_TARGET = 0.10


def make_state(size_mb: int, tensors: int = 8) -> dict:
    """A model-like state: several float32 tensors of random values summing to `size_mb` MiB."""
    per_tensor = size_mb * 2**20 // 4 // tensors
    generator = torch.Generator().manual_seed(0)
    return {"state_dict": {f"layer{i}.weight": torch.randn(per_tensor, generator=generator)
                           for i in range(tensors)},
            "epoch": 3, "global_step": 1000}


def raw_put(fs, local_path: str, key: str) -> float:
    start = time.perf_counter()
    fs.put_file(local_path, key)
    return time.perf_counter() - start


def ours(io: AsyncFsspecCheckpointIO, state: dict, url: str) -> tuple[float, float]:
    """(seconds the caller was blocked, seconds from save's return to committed)."""
    start = time.perf_counter()
    io.save_checkpoint(state, url)
    returned = time.perf_counter()
    io.wait()
    return returned - start, time.perf_counter() - returned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="state size in MiB (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="side-by-side rounds (default 3)")
    args = parser.parse_args()

    proc, endpoint = start_moto_server()
    try:
        endpoint.client().create_bucket(Bucket="bench")
        options = endpoint.storage_options
        fs = fsspec.filesystem("s3", **options)
        io = AsyncFsspecCheckpointIO(storage_options=options)
        state = make_state(args.size_mb)
        with tempfile.NamedTemporaryFile(suffix=".ckpt", delete=False) as f:
            torch.save(state, f)
            reference_file = f.name
        size = os.path.getsize(reference_file)
        # Warm up connections and the server with a small object, outside the timings.
        fs.pipe_file("bench/warmup", b"x" * 2**20)

        refs, blocked, committed = [], [], []
        for round_ in range(args.rounds):
            # Alternate which goes first, so neither always meets a freshly emptied server.
            order = ("ref", "ours") if round_ % 2 == 0 else ("ours", "ref")
            for which in order:
                if which == "ref":
                    refs.append(raw_put(fs, reference_file, f"bench/raw/{round_}.ckpt"))
                    fs.rm_file(f"bench/raw/{round_}.ckpt")
                else:
                    url = f"s3://bench/ours/epoch={round_}.ckpt"
                    held, behind = ours(io, state, url)
                    blocked.append(held)
                    committed.append(behind)
                    assert latest_committed("s3://bench/ours", options) == url
                    remove_committed(url, options)
            print(f"round {round_ + 1}: raw put {refs[-1]:.2f} s | save blocked {blocked[-1]:.2f} s, "
                  f"then committed after {committed[-1]:.2f} s", flush=True)
        io.teardown()
        os.unlink(reference_file)
    finally:
        stop_process(proc)

    ref = statistics.median(refs)
    commit_ratio = statistics.median(committed) / ref
    blocked_fraction = statistics.median(blocked) / ref
    end_to_end = statistics.median(b + c for b, c in zip(blocked, committed)) / ref
    verdict = {True: "meets target", False: "MISSES target"}
    print(f"\ncheckpoint of {size / 2**20:.0f} MiB to a moto S3 server on 127.0.0.1, median of {args.rounds} rounds")
    print(f"reference: raw s3fs.put_file of the same bytes = {ref:.2f} s ({size / 2**20 / ref:.0f} MiB/s)")
    print(f"commit ratio      (save returned -> committed) / raw s3fs.put = {commit_ratio:.3f}"
          f"   [target <= {COMMIT_TARGET}: {verdict[commit_ratio <= COMMIT_TARGET]}]")
    print(f"blocked fraction  (save_checkpoint on the caller) / raw s3fs.put = {blocked_fraction:.1%}"
          f"   [target <= {BLOCKED_TARGET:.0%}: {verdict[blocked_fraction <= BLOCKED_TARGET]}]")
    print(f"end-to-end ratio  (save called -> committed) / raw s3fs.put = {end_to_end:.3f}")
    print(f"best-of-{args.rounds} commit ratio (fastest ours / fastest raw s3fs.put) = {min(committed) / min(refs):.3f}; "
          f"raw s3fs.put ranged {min(refs):.2f}-{max(refs):.2f} s over the rounds")


if __name__ == "__main__":
    main()
