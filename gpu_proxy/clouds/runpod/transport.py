"""The one HTTP transport of gpu-proxy's RunPod clients: a ``requests`` session, retries by urllib3's
``Retry``, answers decoded, refusals turned into :mod:`.errors` exceptions.

Retries: 429 (honouring ``Retry-After``, capped at ``max_backoff_s``), 5xx and network errors, with
exponential backoff. Which calls may be retried after they may have reached RunPod:

* ``retry="all"`` (the default for GET, PUT, PATCH, DELETE): reads, deletes and updates, which are safe
  to repeat;
* ``retry="unsent"`` (the default for POST): only what RunPod certainly did not act on: a refused
  connection and a 429. A POST that timed out or got a 5xx is not repeated blindly;
* :meth:`HTTPTransport.create`: a POST that creates a named thing (a pod, an Instant Cluster). After an
  answer that leaves it unknown whether RunPod made it (a timeout, a 5xx, a dropped connection), it
  first looks the thing up by its unique name and adopts it when found; only then posts again. So a
  retry never makes a second pod.

The API key travels only in the ``Authorization`` header; urllib3 logs URLs and retry counters, never
headers.
"""
from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable, Literal, Mapping, TypeVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from gpu_proxy.clouds.runpod.auth import APIKey
from gpu_proxy.clouds.runpod.errors import RunPodError, RunPodRateLimitError, RunPodUnavailableError

log = logging.getLogger(__name__)

RetryMode = Literal["all", "unsent"]
ErrorFor = Callable[[int, str, str], RunPodError]  # (status, detail, what) -> the exception to raise
Found = TypeVar("Found")
_RETRIED_STATUSES = frozenset({429, *range(500, 600)})
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _Backoff(Retry):
    """urllib3's ``Retry`` with our backoff: ``backoff_s * 2**n`` with jitter from the first retry on
    (urllib3 waits 0 before the first), ``Retry-After`` capped at ``max_backoff_s``, and an injectable
    ``sleep`` (the tests record the waits instead of sleeping)."""

    sleeper: Callable[[float], None] = staticmethod(time.sleep)
    jitter: bool = True

    def new(self, **kw: Any) -> "_Backoff":
        fresh = super().new(**kw)
        fresh.sleeper, fresh.jitter = self.sleeper, self.jitter
        return fresh

    def get_backoff_time(self) -> float:
        attempt = max(0, len(self.history) - 1)
        factor = (0.5 + random.random() / 2) if self.jitter else 1.0
        return min(self.backoff_max, self.backoff_factor * 2 ** attempt * factor)

    def sleep_for_retry(self, response: Any) -> bool:
        retry_after = self.get_retry_after(response)
        if retry_after:
            self.sleeper(min(self.backoff_max, retry_after))
            return True
        return False

    def _sleep_backoff(self) -> None:
        self.sleeper(self.get_backoff_time())


class HTTPTransport:
    """JSON over HTTPS to one base URL, with one key, retries and our errors.

    Args:
        base_url: e.g. ``https://api.runpod.io`` (paths are appended).
        key: the API key (sent as ``Authorization: Bearer``).
        error_for: ``(status, detail, what) -> RunPodError`` for a refusal (4xx, or 5xx after the retries
            of a POST that may not be repeated).
        service: how messages name the other side ("RunPod", "RunPod endpoint abc").
        timeout_s, max_retries, backoff_s, max_backoff_s, jitter, sleep: see :class:`_Backoff`.
        respect_retry_after: wait as long as a 429's ``Retry-After`` says.
    """

    def __init__(self, base_url: str, key: APIKey, *, error_for: ErrorFor, service: str = "RunPod",
                 timeout_s: float = 30.0, max_retries: int = 5, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 jitter: bool = True, respect_retry_after: bool = True,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = key
        self._error_for = error_for
        self.service = service
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        common = dict(total=max_retries, backoff_factor=backoff_s, backoff_max=max_backoff_s,
                      respect_retry_after_header=respect_retry_after, raise_on_status=False)
        retry_all = _Backoff(allowed_methods=None, status_forcelist=_RETRIED_STATUSES, **common)
        # Unsent only: connect errors (nothing reached RunPod) and 429 (RunPod did not act on it).
        retry_unsent = _Backoff(allowed_methods=None, status_forcelist={429}, read=False, other=0, **common)
        self._sessions: dict[str, requests.Session] = {}
        for mode, retry in (("all", retry_all), ("unsent", retry_unsent)):
            retry.sleeper, retry.jitter = sleep, jitter
            session = requests.Session()
            adapter = HTTPAdapter(max_retries=retry)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
            self._sessions[mode] = session

    def __repr__(self) -> str:  # never the key
        return f"HTTPTransport({self.base_url!r})"

    def __reduce__(self):
        raise TypeError("an HTTP transport to RunPod holds your RunPod API key and cannot be pickled")

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                body: Mapping[str, Any] | None = None, what: str = "", retry: RetryMode | None = None) -> Any:
        """One call with retries; the decoded JSON (None for an empty answer). Raises RunPodError."""
        method = method.upper()
        what = what or f"{method} {path}"
        mode: RetryMode = retry or ("all" if method in _IDEMPOTENT else "unsent")
        status, detail, problem, attempts, answer = self._send(method, path, params, body, mode)
        if status is not None and status < 400:
            return answer
        if status is not None and (status not in _RETRIED_STATUSES or (mode == "unsent" and status != 429)):
            raise self._error_for(status, detail, what)
        raise self._exhausted(what, status, problem, attempts)

    def create(self, path: str, body: Mapping[str, Any], *, what: str,
               find: Callable[[], Found | None]) -> "Any | Found":
        """POST that creates a uniquely named thing; after an answer that leaves it unknown whether RunPod
        made it, ``find()`` looks for it first and its non-None result is returned instead of posting again."""
        attempt = 0
        while True:
            status, detail, problem, attempts, answer = self._send("POST", path, None, body, "unsent")
            if status is not None and status < 400:
                return answer
            if status is not None and status not in _RETRIED_STATUSES:
                raise self._error_for(status, detail, what)
            attempt += attempts
            if status == 429 or attempt > self.max_retries:  # a 429 after urllib3's own retries: not made
                raise self._exhausted(what, status, problem, attempt)
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random() / 2))
            log.info("%s: %s: %s; looking for it before retrying in %.1f s", self.service, what, problem, delay)
            self._sleep(delay)
            found = find()
            if found is not None:
                return found

    def _send(self, method: str, path: str, params: Mapping[str, Any] | None, body: Mapping[str, Any] | None,
              mode: RetryMode) -> tuple[int | None, str, str, int, Any]:
        """(status or None, detail, problem, attempts made, decoded answer)."""
        headers = {"Authorization": f"Bearer {self._key.value}", "Accept": "application/json"}
        try:
            response = self._sessions[mode].request(method, self.base_url + path, params=params, json=body,
                                                    headers=headers, timeout=self.timeout_s)
        except (requests.Timeout, requests.ConnectionError) as error:
            timed_out = isinstance(error, requests.Timeout) or "timed out" in str(error).lower()
            problem = (f"no answer within {self.timeout_s:.0f} s" if timed_out
                       else f"could not reach {self.base_url} ({type(error).__name__})")
            # urllib3 gave up after its retries (MaxRetryError inside), or raised at once (a POST's read error)
            gave_up = bool(error.args) and isinstance(error.args[0], MaxRetryError)
            return None, "", problem, self.max_retries + 1 if gave_up else 1, None
        except requests.RequestException as error:  # e.g. RetryError: urllib3 gave up on the statuses
            return None, "", f"{type(error).__name__}", self.max_retries + 1, None
        history = getattr(getattr(response.raw, "retries", None), "history", ()) or ()
        attempts = len(history) + 1
        status = response.status_code
        log.debug("%s %s %s -> %d", self.service, method, path, status)
        if status < 400:
            if status == 204 or not response.content:
                return status, "", "", attempts, None
            return status, "", "", attempts, response.json()
        detail = response_detail(response)
        problem = f"rate limited ({detail})" if status == 429 else f"{self.service} answered {status} ({detail})"
        return status, detail, problem, attempts, None

    def _exhausted(self, what: str, status: int | None, problem: str, attempts: int) -> RunPodError:
        kind = RunPodRateLimitError if status == 429 else RunPodUnavailableError
        return kind(f"{self.service}: {what} failed after {attempts} attempts: {problem}. Try again later; "
                    f"https://status.runpod.io shows outages.", status)


def response_detail(response: requests.Response) -> str:
    """RunPod's explanation in an error answer: a problem+json ``detail``/``title``/``errors``, or the text."""
    try:
        data = response.json()
    except ValueError:
        text = response.text[:300].strip()
        return text or response.reason or f"HTTP {response.status_code}"
    if isinstance(data, dict):
        detail = str(data.get("detail") or data.get("title") or data.get("error") or "")
        if data.get("errors"):
            detail += ": " + "; ".join(map(str, data["errors"]))
        return detail or response.reason
    return response.reason
