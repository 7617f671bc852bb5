"""What a failed download is: fatal with advice (`DownloadError`), or worth another try.

`DownloadError` says what went wrong, for which URL or file, and what to do
about it; `Retryable` marks an attempt that failed in a way another attempt may
fix (a cut connection, a 5xx answer); `RetryPolicy` says how often and how
patiently `captioning.data.download` tries again.
"""

from __future__ import annotations

from dataclasses import dataclass


class DownloadError(RuntimeError):
    """A transfer or archive failed in a way a retry will not fix; says what to do."""

    def __init__(self, url: str, problem: str, advice: str):
        self.url = url
        self.problem = problem
        self.advice = advice
        label = "URL" if "://" in url else "File"
        super().__init__(f"{problem}\n  {label}: {url}\n  What to do: {advice}")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transfer is retried.

    The delay before retry k (0-based) is `min(max_delay_s, backoff_s * 2**k)`;
    tests use tiny delays so that fault injection stays fast.
    """

    retries: int = 5
    backoff_s: float = 1.0
    max_delay_s: float = 60.0
    connect_timeout_s: float = 30.0
    read_timeout_s: float = 120.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        return min(self.max_delay_s, self.backoff_s * 2**attempt)


class Retryable(Exception):
    """This attempt failed, another one may succeed (`download` retries it)."""
