"""The local stack's secrets, in one file only its owner can read (<state>/credentials.json,
mode 600), generated at the first `llmship up`: the store's three identities and its signing
keys (llmship/seaweedfs.py), the gateway's admin token, the Prefect API's auth string and the
Ray cluster's token (also in <state>/ray-auth-token, mode 600, where Ray reads it).

Processes find them there, never on a command line. Prefect's own clients (the CLI, the
worker and its flow runs, the gateway's events) find the auth string in a Prefect profile
beside the server's database (<state>/prefect/profiles.toml, mode 600), the one the stack's
PREFECT_HOME points at; llmship's in-process clients use `prefect_client_settings`.

This module imports no Prefect: the test suite calls it before Prefect reads its settings.
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager

from llmship import seaweedfs
from llmship.processes import write_private
from llmship.settings import Settings

PREFECT_USER = "llmship"


def ensure_credentials(settings: Settings) -> dict[str, str]:
    """Every secret of the local stack, generated once; a file from an older llmship gets what
    it lacks. Also writes the Prefect profile that carries the API's auth string."""
    path = settings.credentials_file
    creds = json.loads(path.read_text()) if path.exists() else {}
    wanted = {
        **seaweedfs.new_secrets(),
        "gateway_admin_token": secrets.token_urlsafe(32),
        "prefect_api_auth_string": f"{PREFECT_USER}:{secrets.token_urlsafe(32)}",
        "ray_auth_token": secrets.token_hex(32),
    }
    missing = {k: v for k, v in wanted.items() if k not in creds}
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.state_dir, 0o700)
    if missing:
        creds.update(missing)
        write_private(path, json.dumps(creds, indent=2))
    os.chmod(path, 0o600)
    write_prefect_profile(settings, creds["prefect_api_auth_string"])
    write_private(settings.ray_auth_token_file, creds["ray_auth_token"])
    return creds


def ray_env(settings: Settings) -> dict[str, str]:
    """What every Ray process and client of this stack needs in its environment, before it
    imports ray (Ray reads it then): token authentication on, and where the token is (never
    the token itself)."""
    env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(settings.ray_auth_token_file),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    if settings.host in ("127.0.0.1", "localhost", "::1") and not settings.ray.address:
        # `ray start` replaces a loopback --node-ip-address with the machine's outward address,
        # unless Ray is told this is a one-node cluster (its switch for laptops): the local
        # stack's cluster stays on loopback.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def write_prefect_profile(settings: Settings, auth_string: str) -> None:
    """The profile Prefect loads from <state>/prefect: where the API is and its password,
    for the server (which then refuses any request without it) and for every client."""
    home = settings.state_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    write_private(
        home / "profiles.toml",
        "\n".join(
            [
                'active = "llmship"',
                "",
                "[profiles.llmship]",
                f'PREFECT_API_URL = "{settings.prefect_api_url}"',
                f'PREFECT_API_AUTH_STRING = "{auth_string}"',
                f'PREFECT_SERVER_API_AUTH_STRING = "{auth_string}"',
                "",
            ]
        ),
    )


@contextmanager
def prefect_client_settings(settings: Settings):
    """Prefect clients made inside this block talk to this stack's server, with its password."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates = {PREFECT_API_URL: settings.prefect_api_url}
    if settings.prefect_api_auth_string:
        updates[PREFECT_API_AUTH_STRING] = settings.prefect_api_auth_string
    with temporary_settings(updates=updates):
        yield
