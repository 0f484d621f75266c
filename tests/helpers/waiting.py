"""Polling until something holds, as the stack tests do everywhere."""

from __future__ import annotations

import time


def wait_for(
    what: str,
    check,
    timeout: float,
    every: float = 1.0,
    retry_on: tuple[type[BaseException], ...] = (),
):
    """Poll check() until it returns something true, and return that. Exceptions in
    retry_on count as "not yet" (an API that is restarting); any other is raised."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if found := check():
                return found
        except retry_on:
            pass
        time.sleep(every)
    raise AssertionError(f"not {what} within {timeout:.0f} s")
