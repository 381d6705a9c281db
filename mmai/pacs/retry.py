"""PACS errors and retries: transient failures (timeouts, refused or aborted associations, HTTP 5xx/429)
are retried with exponential backoff; when the attempts run out the error is ONE line naming the server,
the operation and the last reason."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from mmai.errors import MmaiError

log = logging.getLogger(__name__)
T = TypeVar("T")


class PacsError(MmaiError):
    """A PACS operation failed (search, retrieve or store); the message names the server and operation."""


class TransientPacsError(PacsError):
    """A failure worth retrying: timeout, connection refused, association refused/aborted, HTTP 5xx/429."""


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; the k-th retry waits ``min(base_s * 2**k, max_s)`` seconds;
    ``timeout_s`` bounds each network operation (HTTP request, DIMSE response, association)."""

    attempts: int = 4
    base_s: float = 0.5
    max_s: float = 8.0
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise MmaiError(f"--retries must be >= 0, got {self.attempts - 1}")
        if not self.timeout_s > 0:
            raise MmaiError(f"--pacs-timeout must be > 0 seconds, got {self.timeout_s}")


def with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``fn``; on :class:`TransientPacsError` wait and try again, up to ``policy.attempts`` tries.

    Raises:
        PacsError: one line, ``<what>: <last reason> (gave up after N attempts)``; a non-transient
            :class:`PacsError` is raised at once.
    """
    for k in range(policy.attempts):
        try:
            return fn()
        except TransientPacsError as exc:
            if k == policy.attempts - 1:
                raise PacsError(f"{what}: {_one_line(exc)} (gave up after {policy.attempts} attempt(s))") from exc
            wait = min(policy.base_s * 2**k, policy.max_s)
            log.warning("%s: %s; retrying in %.1f s (attempt %d of %d)", what, _one_line(exc), wait, k + 2,
                        policy.attempts)
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]
