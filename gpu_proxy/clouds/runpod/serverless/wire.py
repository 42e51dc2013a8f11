"""What travels between home and the serverless handler: the job's input and the streamed outputs.

The job input (``{"input": {...}}`` of ``/run``) carries the pickled :class:`RunSpec` inline
(base64) or as an fsspec URL when it is over RunPod's request-size limit, plus where the handler
may write a result too large to stream. Every output the handler yields is
``{"events": [event, ...]}``: the run's events in order, the ``result`` event last. JSON has no
bytes, so bytes travel as ``{"__bytes__": base64}``.

Only framework-free, JSON-safe values here: both sides import this module.
"""
from __future__ import annotations

import base64
import json
import pickle
from typing import Any, Mapping

from gpu_proxy.events import Event
from gpu_proxy.runs.log_codec import decode_value, encode_value  # JSON with bytes, as in job logs
from gpu_proxy.runs.spec import RunSpec
from gpu_proxy.secrets import is_secret_name

PROTOCOL = 1
#: RunPod refuses a /run body over 10 MB; keep a margin for JSON and headers.
MAX_REQUEST_BYTES = 9_500_000
#: A result larger than this goes to storage (when the run has some) instead of the stream.
DEFAULT_RESULT_INLINE_MAX = 8_000_000


def encode_event(event: Event) -> dict[str, Any]:
    return encode_value(event.to_dict())


def decode_events(output: Any) -> list[Event]:
    """The events of one streamed output; anything that is not ours is ignored."""
    if not isinstance(output, dict) or not isinstance(output.get("events"), list):
        return []
    return [Event.from_dict(decode_value(raw)) for raw in output["events"]]


def public_storage_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` without credentials: the job input is stored (and may be logged) by
    RunPod, so the worker gets its credentials from the endpoint's environment instead."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not is_secret_name(str(k))}
        return value

    return strip(dict(options or {}))


def job_input(spec_bytes: bytes | None, run_url: str | None, result_url: str | None,
              storage_options: Mapping[str, Any] | None, result_inline_max: int,
              secrets: Mapping[str, str] | None = None, secrets_url: str | None = None,
              stop_url: str | None = None) -> dict[str, Any]:
    """``secrets`` (the run's :attr:`RunSpec.secrets`, never in its pickle) travel inline only when
    the run has no storage; otherwise home writes them to ``secrets_url`` and the handler deletes
    that file as it reads it. When home writes a file at ``stop_url``, the handler asks the run to
    stop at its next step boundary, as Ctrl-C does on the other paths."""
    return {"gpu_proxy": PROTOCOL,
            "run": base64.b64encode(spec_bytes).decode("ascii") if spec_bytes is not None else None,
            "run_url": run_url, "result_url": result_url, "result_inline_max": result_inline_max,
            "storage_options": public_storage_options(storage_options),
            "secrets": dict(secrets or {}), "secrets_url": secrets_url, "stop_url": stop_url}


def read_spec(job_in: Mapping[str, Any]) -> RunSpec:
    """The run a job input carries (inline or at its URL)."""
    if not isinstance(job_in, Mapping) or job_in.get("gpu_proxy") != PROTOCOL:
        raise ValueError("this job was not sent by gpu-proxy (or by a different version): its input needs "
                         f"'gpu_proxy': {PROTOCOL}. Submit runs with gpu_proxy.RunPodServerless.")
    import fsspec

    options = job_in.get("storage_options") or {}
    if job_in.get("run"):
        spec = pickle.loads(base64.b64decode(job_in["run"]))
    else:
        with fsspec.open(job_in["run_url"], "rb", **options) as f:
            spec = pickle.loads(f.read())
    spec.secrets = dict(job_in.get("secrets") or {})
    if job_in.get("secrets_url"):
        fs, path = fsspec.core.url_to_fs(job_in["secrets_url"], **options)
        spec.secrets.update(json.loads(fs.cat_file(path)))
        fs.rm_file(path)  # read once: the secrets do not stay in storage
    return spec
