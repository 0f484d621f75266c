"""The Prefect UI's rollback form offers the published versions to pick from.

A deployment's parameter schema is what the UI draws its run form from; `prefect deploy` makes
it from the flow's signature, where `target_version` can only be "a string". Each time a
version is published (and at `llmship up`), the rollback deployments of that model get the
versions in the store as the field's choices, newest first, with what a person needs to choose
in the field's description: when each was made, its gate verdict, which is live. Versions
another stack published into the same bucket appear at the next publish or `llmship up`.
"""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentUpdate
from prefect.client.schemas.filters import FlowFilter, FlowFilterName

from llmship.credentials import prefect_client_settings
from llmship.settings import Settings
from llmship.store import ArtifactStore
from llmship.versions import PublishedVersion, list_versions, signature_problem

ROLLBACK_FLOW = "rollback"
TARGET_FIELD = "target_version"
# Enough to choose from; older versions are still reachable with `llmship rollback --to`.
LISTED_IN_DESCRIPTION = 10


def target_version_field(
    field: dict,
    versions: list[PublishedVersion],
    live: str | None,
    previous: str | None,
    unsigned: frozenset[str] = frozenset(),
) -> dict:
    """The target_version schema with the versions as choices (newest first); empty stays
    allowed, meaning the previous version. A version in unsigned is said to be refused."""
    newest_first = sorted(versions, key=lambda v: v.created_at, reverse=True)
    base = field.get("description", "").split("\n\nPublished versions")[0]
    lines = []
    for v in newest_first[:LISTED_IN_DESCRIPTION]:
        alias = {live: " (live)", previous: " (previous)"}.get(v.version, "")
        gate = "gate passed" if v.gate_passed else "gate NOT passed: needs allow_ungated"
        if v.version in unsigned:
            gate = "NOT signed by a trusted key: refused (`llmship verify`)"
        lines.append(f"- `{v.version}` {v.created_at[:16].replace('T', ' ')} UTC, {gate}{alias}")
    choices = [{"type": "string", "enum": [v.version for v in newest_first]}] if versions else []
    return {
        **{k: v for k, v in field.items() if k not in ("anyOf", "type", "enum")},
        "anyOf": [*choices, {"type": "null"}],
        "description": base
        + ("\n\nPublished versions, newest first:\n" + "\n".join(lines) if lines else ""),
    }


def offer_published_versions(settings: Settings, model: str | None = None) -> list[str]:
    """Refresh the target_version choices of `model`'s rollback deployments (every model's,
    when None); the names of the deployments refreshed."""
    store = ArtifactStore(settings)
    refreshed = []
    with prefect_client_settings(settings), get_client(sync_client=True) as client:
        for deployment in client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[ROLLBACK_FLOW]))
        ):
            schema = dict(deployment.parameter_openapi_schema or {})
            properties = dict(schema.get("properties", {}))
            of = deployment.parameters.get("model")
            if not of or model not in (None, of) or TARGET_FIELD not in properties:
                continue
            versions = list_versions(store, of)
            # Checked for the versions the description lists only: two reads each.
            listed = sorted(versions, key=lambda v: v.created_at, reverse=True)[
                :LISTED_IN_DESCRIPTION
            ]
            properties[TARGET_FIELD] = target_version_field(
                properties[TARGET_FIELD],
                versions,
                store.read_alias(of, "live"),
                store.read_alias(of, "previous"),
                frozenset(v.version for v in listed if signature_problem(store, v)),
            )
            schema["properties"] = properties
            client.update_deployment(
                deployment.id, DeploymentUpdate(parameter_openapi_schema=schema)
            )
            refreshed.append(deployment.name)
    return refreshed
