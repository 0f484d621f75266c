"""The Hugging Face hub: source names, offline mode, and huggingface_hub's errors as llmship's.

One mapping of the hub's errors, used by the download stage, the preflight and `llmship plan`,
each error saying what to do.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from llmship.errors import HubUnreachable, PermanentError, SourceNotFound


def split_hf(source: str) -> tuple[str, str]:
    """hf://org/name@revision -> (org/name, revision)."""
    repo, _, revision = source.removeprefix("hf://").partition("@")
    return repo, revision


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


@contextmanager
def hub_errors(repo: str, revision: str, what: str, *, offline: bool) -> Iterator[None]:
    """huggingface_hub's errors as llmship's, each saying what to do. Order matters:
    LocalEntryNotFoundError is an EntryNotFoundError, GatedRepoError a RepositoryNotFoundError."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    fill = (
        f"fill the cache where the hub is reachable (`hf download {repo} --revision "
        f"{revision}` with HF_HUB_CACHE={constants.HF_HUB_CACHE}) or copy that cache here"
    )
    try:
        yield
    except RevisionNotFoundError as exc:
        raise SourceNotFound(
            f"revision {revision!r} of {repo} does not exist on the hub: pin an existing "
            "commit sha, branch or tag"
        ) from exc
    except GatedRepoError as exc:
        raise PermanentError(
            f"{repo} is gated and this worker's token has no access: accept its licence at "
            f"https://huggingface.co/{repo}, then set HF_TOKEN for the workers"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise SourceNotFound(
            f"repository {repo} was not found on the hub (or it is private: set HF_TOKEN)"
        ) from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        if offline:
            raise SourceNotFound(
                f"{what} of {repo}@{revision} is not in the local hub cache and this worker "
                f"does not go to the hub (offline: HF_HUB_OFFLINE or --offline): {fill}"
            ) from exc
        # The hub did not answer: worth a retry, and the message says what else to do.
        raise HubUnreachable(
            f"the hub did not answer and {what} of {repo}@{revision} is not "
            f"in the local hub cache: retry when it is reachable, or {fill}"
        ) from exc
    except EntryNotFoundError as exc:
        raise SourceNotFound(f"{repo}@{revision} has no {what}") from exc
