"""The stack's Prefect API for tests that call it over HTTP (its events, say): the server
wants the auth string `llmship up` generated (llmship/credentials.py)."""

from __future__ import annotations


def prefect_auth(settings) -> tuple[str, str]:
    """httpx's `auth=` for the stack's Prefect API."""
    user, _, password = settings.prefect_api_auth_string.partition(":")
    return user, password


def events_named(settings, name: str, limit: int = 50) -> list[dict]:
    """The stack's stored events of one name, newest first. The server stores events in
    batches, a few seconds after automations have acted on them: poll for one."""
    import httpx

    return httpx.post(
        f"{settings.prefect_api_url}/events/filter",
        auth=prefect_auth(settings),
        json={"filter": {"event": {"name": [name]}}, "limit": limit},
    ).json()["events"]


def run_deployment(name, **kwargs):
    """Prefect's run_deployment, checking on the run every second: its default of 5 s adds up
    to 5 s to each of the suite's hundred-odd waits for a flow run."""
    from prefect.deployments import run_deployment as prefect_run_deployment

    kwargs.setdefault("poll_interval", 1)
    return prefect_run_deployment(name, **kwargs)


DEMO = "build-and-serve/tiny-llama"


def suite_config(prefect_client) -> dict:
    """The demo deployment's config as the suite runs it: its search cut to the recipe that
    costs nothing (UNQUANTIZED, the baseline's own build) beside calibration. The demo's other
    W8A8 recipe is one more calibration, vLLM server, evaluation and measurement: some 9
    minutes of the suite on 2 shared cores (`make demo` runs all three; docs/BENCHMARKS.md)."""
    import json

    deployment = prefect_client.read_deployment_by_name(DEMO)
    config = json.loads(json.dumps(deployment.parameters["config"]))
    config["search"] = [{"scheme": "UNQUANTIZED"}]
    return config
