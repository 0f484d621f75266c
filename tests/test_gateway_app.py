"""create_app(settings): a gateway app on the settings it is given, none read from the
environment, so two apps with different settings run side by side in one process."""

from __future__ import annotations

from fastapi.testclient import TestClient

from llmship.settings import Settings


def test_two_apps_made_for_their_own_settings_serve_on_them(tmp_path):
    from serving.gateway import create_app

    def settings(token: str) -> Settings:
        # No S3 and no Ray to ask, whatever the environment says: the routes saved, none.
        return Settings(
            state_dir=tmp_path / token,
            gateway={"admin_token": token},
            s3={"access_key": None},
            ray={"address": None},
        )

    apps = {token: create_app(settings(token)) for token in ("first-token", "second-token")}
    with TestClient(apps["first-token"]) as first, TestClient(apps["second-token"]) as second:
        for client, token, other in (
            (first, "first-token", "second-token"),
            (second, "second-token", "first-token"),
        ):
            assert (
                client.get("/admin/routes", headers={"authorization": f"Bearer {token}"}).json()
                == {}
            )
            assert (
                client.get(
                    "/admin/routes", headers={"authorization": f"Bearer {other}"}
                ).status_code
                == 403
            )
            assert client.get("/health").json() == {"status": "ok", "models": []}
