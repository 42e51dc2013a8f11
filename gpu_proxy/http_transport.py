"""gpu-proxy's one HTTP transport: a ``requests`` session whose retries are urllib3's ``Retry``.

Every HTTP API the project calls by hand goes through it: RunPod's REST and serverless job APIs
(:mod:`gpu_proxy.clouds.runpod.transport` adds the key and RunPod's errors), a Ray dashboard
(:mod:`gpu_proxy.clusters.dashboard`) and container registries (:mod:`gpu_proxy.clouds.runpod.image.registry`).
Each caller says only its :class:`RetryPolicy` and how a refusal reads in its own terms.

What is retried: the policy's statuses (429, honouring ``Retry-After`` capped at ``max_backoff_s``;
5xx) and network errors, with backoff ``backoff_s * 2**n`` (jitter), capped. Whether a call may be
repeated once it may have reached the server:

* ``retry="all"`` (the default for GET, HEAD, PUT, PATCH, DELETE, OPTIONS): reads, deletes and
  updates, which are safe to repeat;
* ``retry="unsent"`` (the default for POST): only what the server certainly did not act on: a
  connection never made, and a 429. A POST that timed out or got a 5xx is not repeated blindly;
* :meth:`HTTPTransport.create`: a POST that creates a uniquely named thing. After an answer that
  leaves it unknown whether the server made it (a timeout, a 5xx, a dropped connection), it first
  looks the thing up by name (``find``) and adopts it when found; only then posts again. So a retry
  never makes two.

Credentials travel only in headers computed per call (``headers``); urllib3 logs URLs and retry
counters, never headers; a transport refuses to be pickled.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, TypeVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from gpu_proxy.errors import GpuProxyError

log = logging.getLogger(__name__)

RetryMode = Literal["all", "unsent"]
Found = TypeVar("Found")
RETRIED_STATUSES = frozenset({429, *range(500, 600)})
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HTTPCallError(GpuProxyError, OSError):
    """An HTTP call failed. ``status``: the last HTTP status (None: no answer); ``url``: what was called;
    ``problem``: the last failure in a few words. An ``OSError`` too, like the network errors it stands for."""

    def __init__(self, message: str, status: int | None = None, url: str = "", detail: str = "",
                 problem: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.url = url
        self.detail = detail
        self.problem = problem or detail


# (status, detail, what) -> the exception for a refusal; (status or None, message) -> the one for retries spent
ErrorFor = Callable[[int, str, str], Exception]
GaveUpFor = Callable[["int | None", str], Exception]


@dataclass(frozen=True)
class RetryPolicy:
    """What one transport retries and how long it waits.

    Args:
        max_retries: retries of one call before giving up (so ``max_retries + 1`` attempts).
        backoff_s, max_backoff_s: wait ``backoff_s * 2**n`` before retry ``n + 1``, at most ``max_backoff_s``.
        jitter: multiply each wait by a random 0.5-1 (many clients retrying at once spread out).
        respect_retry_after: a 429's ``Retry-After`` wins (capped at ``max_backoff_s``).
        statuses: the HTTP statuses worth another try.
        connect_errors: retry a connection that failed (refused, DNS): nothing reached the server.
        read_errors: retry a call whose answer broke off or timed out (``retry="all"`` calls only).
        sleep: how to wait (tests record the waits instead).
    """

    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    jitter: bool = True
    respect_retry_after: bool = True
    statuses: frozenset[int] = RETRIED_STATUSES
    connect_errors: bool = True
    read_errors: bool = True
    sleep: Callable[[float], None] = time.sleep

    def wait_s(self, retry_number: int) -> float:
        """The wait before retry ``retry_number`` (1 is the first)."""
        factor = (0.5 + random.random() / 2) if self.jitter else 1.0
        return min(self.max_backoff_s, self.backoff_s * 2 ** max(0, retry_number - 1) * factor)

    def urllib3_retry(self, mode: RetryMode) -> Retry:
        """urllib3's ``Retry`` for calls that may be repeated (``"all"``) or only when unsent."""
        unsent = mode == "unsent"
        retry = _Backoff(total=self.max_retries, backoff_factor=self.backoff_s,
                         respect_retry_after_header=self.respect_retry_after, raise_on_status=False,
                         allowed_methods=None, status_forcelist=({429} & self.statuses) if unsent else self.statuses,
                         connect=None if self.connect_errors else 0,
                         read=False if unsent or not self.read_errors else None, other=0 if unsent else None)
        retry.policy = self
        return retry


class _Backoff(Retry):
    """urllib3's ``Retry`` waiting as :meth:`RetryPolicy.wait_s` says (urllib3 itself waits 0 before
    the first retry and has no injectable sleep)."""

    policy: RetryPolicy = RetryPolicy()

    def new(self, **kw: Any) -> "_Backoff":
        fresh = super().new(**kw)
        fresh.policy = self.policy
        return fresh

    def get_backoff_time(self) -> float:
        return self.policy.wait_s(len(self.history))

    def sleep_for_retry(self, response: Any) -> bool:
        retry_after = self.get_retry_after(response) if self.respect_retry_after_header else None
        if retry_after:
            self.policy.sleep(min(self.policy.max_backoff_s, retry_after))
            return True
        return False

    def _sleep_backoff(self) -> None:
        self.policy.sleep(self.get_backoff_time())


def retrying_session(policy: RetryPolicy, mode: RetryMode = "all") -> requests.Session:
    """A ``requests`` session retrying as ``policy`` says (for callers that read raw answers themselves)."""
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=policy.urllib3_retry(mode))
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


@dataclass(frozen=True)
class _Answer:
    status: int | None  # None: no answer
    detail: str  # the server's explanation of a refusal
    problem: str  # what went wrong, in a sentence's words
    attempts: int
    response: requests.Response | None


class HTTPTransport:
    """Calls to one base URL, with retries and errors in the caller's terms.

    Args:
        base_url: e.g. ``https://api.runpod.io`` (paths are appended).
        service: how messages name the other side ("RunPod", "the Ray dashboard at http://...").
        headers: the headers of every call, computed per call (credentials stay out of attributes).
        timeout_s: per attempt.
        policy: what is retried (:class:`RetryPolicy`).
        error_for: ``(status, detail, what) -> exception`` for a refusal (a status not retried, or a 5xx
            to a POST that may not be repeated); default :class:`HTTPCallError`.
        gave_up_for: ``(status or None, message) -> exception`` once retries are spent; default
            :class:`HTTPCallError`. The message names the URL, the attempts and ``hint``.
        hint: what the user can do when the retries are spent ("Try again later; ...").
    """

    def __init__(self, base_url: str, *, service: str, headers: Callable[[], Mapping[str, str]] | None = None,
                 timeout_s: float = 30.0, policy: RetryPolicy = RetryPolicy(), error_for: ErrorFor | None = None,
                 gave_up_for: GaveUpFor | None = None, hint: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self.service = service
        self.timeout_s = timeout_s
        self.policy = policy
        self.hint = hint
        self._headers = headers or dict
        self._error_for = error_for
        self._gave_up_for = gave_up_for
        self._sessions: dict[str, requests.Session] = {}  # per retry mode, made when first used

    def __repr__(self) -> str:  # never a header
        return f"HTTPTransport({self.base_url!r})"

    def __reduce__(self):
        raise TypeError("an HTTP transport holds credentials and open connections and cannot be pickled")

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                body: Any = None, data: bytes | None = None, what: str = "", retry: RetryMode | None = None,
                timeout_s: float | None = None) -> Any:
        """One call with retries: ``body`` goes as JSON, ``data`` as bytes; returns the decoded JSON
        answer (None for an empty one). Raises what ``error_for``/``gave_up_for`` make."""
        method = method.upper()
        what = what or f"{method} {path}"
        mode: RetryMode = retry or ("all" if method in _IDEMPOTENT else "unsent")
        answer = self._send(method, path, params, body, data, mode, timeout_s)
        if answer.status is not None and answer.status < 400:
            return _decoded(answer.response)
        if answer.status is not None and (answer.status not in self.policy.statuses
                                          or (mode == "unsent" and answer.status != 429)):
            raise self._refused(answer, what, method, path)
        raise self._gave_up(what, method, path, answer.status, answer.problem, answer.attempts)

    def create(self, path: str, body: Mapping[str, Any], *, what: str,
               find: Callable[[], Found | None]) -> "Any | Found":
        """POST that creates a uniquely named thing; after an answer that leaves it unknown whether the
        server made it, ``find()`` looks for it first and its non-None result is returned instead of
        posting again."""
        attempts = 0
        while True:
            answer = self._send("POST", path, None, body, None, "unsent", None)
            if answer.status is not None and answer.status < 400:
                return _decoded(answer.response)
            if answer.status is not None and answer.status not in self.policy.statuses:
                raise self._refused(answer, what, "POST", path)
            attempts += answer.attempts
            if answer.status == 429 or attempts > self.policy.max_retries:  # a 429 after urllib3's retries: not made
                raise self._gave_up(what, "POST", path, answer.status, answer.problem, attempts)
            delay = self.policy.wait_s(attempts)
            log.info("%s: %s: %s; looking for it before retrying in %.1f s", self.service, what, answer.problem, delay)
            self.policy.sleep(delay)
            found = find()
            if found is not None:
                return found

    def _send(self, method: str, path: str, params: Mapping[str, Any] | None, body: Any, data: bytes | None,
              mode: RetryMode, timeout_s: float | None) -> _Answer:
        timeout = timeout_s or self.timeout_s
        headers = {"Accept": "application/json", **self._headers()}
        try:
            if mode not in self._sessions:
                self._sessions[mode] = retrying_session(self.policy, mode)
            response = self._sessions[mode].request(method, self.base_url + path, params=params, json=body,
                                                    data=data, headers=headers, timeout=timeout)
        except (requests.Timeout, requests.ConnectionError) as error:
            timed_out = isinstance(error, requests.Timeout) or "timed out" in str(error).lower()
            problem = f"no answer within {timeout:g} s" if timed_out else f"could not connect ({_reason(error)})"
            # urllib3 gave up after its retries (MaxRetryError inside), or raised at once (a POST's read error)
            gave_up = bool(error.args) and isinstance(error.args[0], MaxRetryError)
            return _Answer(None, "", problem, self.policy.max_retries + 1 if gave_up else 1, None)
        except requests.RequestException as error:  # e.g. RetryError: urllib3 gave up on the statuses
            return _Answer(None, "", type(error).__name__, self.policy.max_retries + 1, None)
        history = getattr(getattr(response.raw, "retries", None), "history", ()) or ()
        status = response.status_code
        log.debug("%s %s %s -> %d", self.service, method, path, status)
        if status < 400:
            return _Answer(status, "", "", len(history) + 1, response)
        detail = response_detail(response)
        problem = f"rate limited ({detail})" if status == 429 else f"answered {status} ({detail})"
        return _Answer(status, detail, problem, len(history) + 1, response)

    def _refused(self, answer: _Answer, what: str, method: str, path: str) -> Exception:
        assert answer.status is not None
        if self._error_for is not None:
            return self._error_for(answer.status, answer.detail, what)
        return HTTPCallError(f"{self.service} refused to {what}: {method} {self.base_url + path} answered "
                             f"{answer.status} ({answer.detail}).", answer.status, self.base_url + path, answer.detail)

    def _gave_up(self, what: str, method: str, path: str, status: int | None, problem: str,
                 attempts: int) -> Exception:
        url = self.base_url + path
        message = (f"{self.service}: {what} failed after {attempts} attempt{'s' if attempts != 1 else ''} "
                   f"({method} {url}): {problem}.{' ' + self.hint if self.hint else ''}")
        if self._gave_up_for is not None:
            return self._gave_up_for(status, message)
        return HTTPCallError(message, status, url, problem=problem)


def _reason(error: requests.RequestException) -> str:
    """The socket's own words ("[Errno 111] Connection refused"), under requests' and urllib3's wrappers."""
    inner: Any = error.args[0] if error.args else error
    inner = getattr(inner, "reason", inner)  # a MaxRetryError's last error
    return str(inner).rsplit(": ", 1)[-1] or type(error).__name__


def _decoded(response: requests.Response | None) -> Any:
    if response is None or response.status_code == 204 or not response.content:
        return None
    return response.json()


def response_detail(response: requests.Response) -> str:
    """The server's explanation in an error answer: a problem+json ``detail``/``title``/``errors``, or the text."""
    try:
        data = response.json()
    except ValueError:
        text = response.text[:300].strip()
        return text or response.reason or f"HTTP {response.status_code}"
    if isinstance(data, dict):
        detail = str(data.get("detail") or data.get("title") or data.get("error") or data.get("message") or "")
        if data.get("errors"):
            detail += ": " + "; ".join(map(str, data["errors"]))
        return detail or response.reason or f"HTTP {response.status_code}"
    return response.reason or f"HTTP {response.status_code}"
