"""huggingface_hub's errors, mapped once (llmship/hub.py) for the download stage and the
preflight: each becomes llmship's error that says what to do, and the preflight reports it as
a refusal (or, where the hub cannot be asked, as a check not made)."""

import httpx
import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from llmship.errors import HubUnreachable, PermanentError, SourceNotFound
from llmship.hub import hub_errors, split_hf

REPO, REVISION = "meta-llama/Meta-Llama-3-70B-Instruct", "0123abcd"


def response(status: int) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("GET", f"https://huggingface.co/{REPO}"))


@pytest.mark.parametrize(
    "raised, expected, says",
    [
        (
            RevisionNotFoundError("no", response=response(404)),
            SourceNotFound,
            f"revision '{REVISION}' of {REPO} does not exist on the hub: pin an existing",
        ),
        (
            GatedRepoError("gated", response=response(403)),
            PermanentError,
            f"accept its licence at https://huggingface.co/{REPO}, then set HF_TOKEN",
        ),
        (
            RepositoryNotFoundError("no", response=response(404)),
            SourceNotFound,
            "(or it is private: set HF_TOKEN)",
        ),
        (
            LocalEntryNotFoundError("not cached"),
            HubUnreachable,
            "retry when it is reachable, or fill the cache where the hub is reachable",
        ),
    ],
)
def test_each_hub_error_becomes_one_that_says_what_to_do(raised, expected, says):
    with (
        pytest.raises(expected) as caught,
        hub_errors(REPO, REVISION, "config.json", offline=False),
    ):
        raise raised
    assert says in str(caught.value)


def test_offline_a_missing_cache_entry_is_not_retried_and_says_how_to_fill_it():
    with (
        pytest.raises(SourceNotFound, match="does not go to the hub") as caught,
        hub_errors(REPO, REVISION, "config.json", offline=True),
    ):
        raise LocalEntryNotFoundError("not cached")
    assert f"hf download {REPO} --revision {REVISION}" in str(caught.value)


def test_the_preflight_reports_the_same_mapping_as_a_refusal(monkeypatch):
    from huggingface_hub import HfApi

    from tasks.preflight import check_hub_access

    def gated(self, repo, **kwargs):
        raise GatedRepoError("gated", response=response(403))

    monkeypatch.setattr(HfApi, "model_info", gated)
    check = check_hub_access(f"hf://{REPO}@{REVISION}")
    assert check.ok is False and "accept its licence" in check.detail

    def unreachable(self, repo, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    assert check_hub_access(f"hf://{REPO}@{REVISION}").ok is None


def test_a_hub_source_names_its_repository_and_revision():
    assert split_hf(f"hf://{REPO}@{REVISION}") == (REPO, REVISION)
