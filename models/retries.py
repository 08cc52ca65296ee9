"""The one retry policy for calls to outside services (Stripe, SMTP): a few attempts, exponential waits."""

from __future__ import annotations

from typing import Any, Callable

import tenacity


def retry_policy(
    *,
    attempts: int,
    wait_seconds: float,
    max_wait_seconds: float,
    retry: tenacity.retry_base,
    before_sleep: Callable[[tenacity.RetryCallState], Any],
) -> tenacity.Retrying:
    """Up to `attempts` tries, waiting wait_seconds × 1, 2, 4 … (capped) between; the last error is re-raised."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=wait_seconds, max=max_wait_seconds),
        retry=retry,
        before_sleep=before_sleep,
        reraise=True,
    )
