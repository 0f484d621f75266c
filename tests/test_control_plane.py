"""The production control plane: the Prefect server of an llmship stack on PostgreSQL
(Settings.prefect_database_url), where SQLite's one writer at a time gave concurrent runs
"database is locked", 503s and repeated alerts (issue 26, docs/FINDINGS.md)."""

import secrets
from pathlib import Path

import pytest
from pydantic import SecretStr

from llmship.settings import Settings
from tests.helpers.control_plane import (
    concurrent_load,
    postgres_bin,
    prefect_only_stack,
    private_postgres,
    psql,
)

PG_PORT = 15432
PREFECT_PORT = 14320


def test_the_database_url_is_a_secret_kept_from_children_and_output():
    from llmship.stack import child_env, database_description, prefect_database_env

    url = "postgresql+asyncpg://llmship:s3cret-pw@db.internal:5432/prefect"
    settings = Settings(prefect_database_url=url)
    assert "s3cret-pw" not in repr(settings)
    assert "s3cret-pw" not in str(child_env(settings))
    assert "s3cret-pw" not in database_description(settings)
    assert database_description(settings).endswith("llmship:***@db.internal:5432/prefect")
    assert prefect_database_env(settings) == {"PREFECT_API_DATABASE_CONNECTION_URL": url}
    assert prefect_database_env(Settings(prefect_database_url=None)) == {}


def test_a_database_url_not_for_asyncpg_is_refused_without_echoing_it():
    with pytest.raises(ValueError, match="postgresql\\+asyncpg://") as refused:
        Settings(prefect_database_url="postgresql://llmship:s3cret-pw@db:5432/prefect")
    assert "s3cret-pw" not in str(refused.value)


@pytest.mark.stack
def test_prefect_on_postgres_takes_concurrent_writes(tmp_path: Path):
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL's binaries are not installed (/usr/lib/postgresql/*/bin)")
    password = secrets.token_urlsafe(24)
    with (
        private_postgres(bin_dir, PG_PORT, password) as url,
        prefect_only_stack(
            tmp_path / "state", PREFECT_PORT, prefect_database_url=SecretStr(url)
        ) as settings,
    ):
        load = concurrent_load(settings, events=20, emitters=2, writers=20, runs_per_writer=1)
        assert load.failures == [], load.failures
        # The flow runs are rows in PostgreSQL: the server writes there, not to a SQLite file.
        rows = psql(bin_dir, PG_PORT, password, "SELECT id FROM flow_run").split()
        assert sorted(rows) == sorted(load.flow_run_ids) and len(rows) == 20
        assert not (settings.state_dir / "prefect" / "prefect.db").exists()
        log = (settings.state_dir / "logs" / "prefect-server.log").read_text()
        assert "database is locked" not in log
        # The password reached neither the server's log nor its command line.
        assert password not in log
        from llmship import processes

        [server] = [r for r in processes.records(settings) if r.name == "prefect-server"]
        assert password not in Path(f"/proc/{server.pid}/cmdline").read_text()
