"""The serving control path's messages (llmship/serving_messages.py) read what earlier llmship
wrote and write it back byte for byte: the routes a gateway saves and answers, a rollout's
route order, the shadow pairs, the alias documents in S3."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from llmship.serving_messages import Alias, KeptPairs, Route, RouteOrder

# As the gateway before issue 29 saved it (routes.json) and answered GET /admin/routes.
ROUTE = (
    '{"version": "v1", "since": "2026-12-07T02:00:00+00:00", "canary": {"version": "v2", '
    '"percent": 10.0}, "shadow": {"version": "v2", "fraction": 0.5, "max_rps": 5.0, '
    '"keep_examples": 2}}'
)
# As ArtifactStore.move_alias before issue 29 wrote aliases/<model>/<alias>.json.
ALIAS = (
    '{"model": "m", "alias": "live", "version": "v2", "previous": "v1", "updated_at": '
    '"2026-12-07T02:00:00+00:00", "reason": "rollout", "ungated_override": false}'
)
# As a gateway answered GET /admin/shadow/{model}, one version's.
KEPT = {
    "pairs": [
        {
            "at": 1765072800.25,
            "request_sha256": "a" * 64,
            "live_sha256": "b" * 64,
            "candidate_sha256": "c" * 64,
            "agreement": "none",
        }
    ],
    "examples": [
        {
            "at": 1765072800.25,
            "request_sha256": "a" * 64,
            "prompt": [{"role": "user", "content": "q"}],
            "live": "yes",
            "candidate": "no",
        }
    ],
}


def test_a_saved_route_reads_and_dumps_as_it_was_written():
    assert json.dumps(Route.model_validate_json(ROUTE).model_dump()) == ROUTE
    assert json.dumps(Route.model_validate(json.loads(ROUTE)).model_dump()) == ROUTE


def test_a_route_order_is_the_body_a_rollout_sent():
    route = Route.model_validate_json(ROUTE)
    sent = {"version": "v1", "canary": {"version": "v2", "percent": 10.0}, "shadow": None}
    order = RouteOrder.model_validate(sent)
    assert order.model_dump() == sent
    assert route.order().model_dump() == {**sent, "shadow": json.loads(ROUTE)["shadow"]}
    assert route.versions() == ["v1", "v2"]


def test_an_alias_document_reads_and_dumps_as_it_was_written():
    assert json.dumps(Alias.model_validate_json(ALIAS).model_dump(mode="json")) == ALIAS


def test_an_alias_keeps_its_version_and_drops_a_hand_edited_note():
    edited = json.loads(ALIAS) | {"reason": 7, "previous": ["v0"], "ungated_override": "yes"}
    alias = Alias.model_validate(edited)
    assert (alias.version, alias.reason, alias.previous, alias.ungated_override) == (
        "v2",
        "7",
        None,
        False,
    )
    with pytest.raises(ValidationError):
        Alias.model_validate(json.loads(ALIAS) | {"version": "../v2"})


def test_kept_shadow_pairs_read_and_dump_as_a_gateway_answered_them():
    kept = KeptPairs.model_validate(KEPT)
    assert kept.model_dump() == KEPT
    assert (kept + kept).model_dump() == {k: v + v for k, v in KEPT.items()}
