"""A run supervised in this process (the embedded cluster): the supervisor in a thread, events here."""
from __future__ import annotations

import threading
from typing import Any

from gpu_proxy.runs.control import RunControl, StopRequest
from gpu_proxy.runs.spec import RunSpec
from gpu_proxy.runs.supervisor import StopRequestCount, supervise


def execute_in_process(spec: RunSpec, control: RunControl) -> list[dict[str, Any]]:
    """Supervise ``spec`` on the Ray cluster this process is connected to; events reach ``control``."""
    stop = StopRequestCount()
    result: dict[str, Any] = {}

    def supervise_in_background() -> None:
        try:
            result["outcomes"] = supervise(spec, control.post, stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            result["error"] = exc
        finally:
            control.finish()

    thread = threading.Thread(target=supervise_in_background, name=f"gpu-proxy-{spec.name}", daemon=True)
    thread.start()
    for item in control.items():
        if isinstance(item, StopRequest):
            stop.request()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["outcomes"]
