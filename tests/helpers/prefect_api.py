"""The stack's Prefect API for tests that call it over HTTP (its events, say): the server
wants the auth string `llmship up` generated (llmship/credentials.py)."""

from __future__ import annotations


def prefect_auth(settings) -> tuple[str, str]:
    """httpx's `auth=` for the stack's Prefect API."""
    user, _, password = settings.prefect_api_auth_string.partition(":")
    return user, password
