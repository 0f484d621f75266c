"""What every stage's @task wrapper shares: retry policy, the stage runner, slots, artifacts."""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from prefect import Task, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.exceptions import MissingContextError
from prefect.states import State
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from llmship.contracts import StageInputs, StageOutput
from llmship.errors import LlmshipError, PermanentError, VersionConflict
from llmship.manifest import Manifest
from llmship.settings import get_settings
from llmship.store import ArtifactStore

# Transient failures (network, S3 5xx, a killed subprocess) are retried with growing delays.
RETRIES = 3
RETRY_DELAYS = exponential_backoff(backoff_factor=2)

Output = TypeVar("Output", bound=StageOutput)
R = TypeVar("R", bound=BaseModel)
Made = tuple[BaseModel, dict[str, float]]  # a stage's details, and its timings in seconds


def retry_unless_permanent(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect retry condition: bad input and failed gates fail at once; the rest is retried.
    A module missing from an environment is no transient either (seen on the GPU host: Ray
    Serve without numpy, tried four times over 14 s before the run failed)."""
    try:
        state.result()
    except (PermanentError, ImportError):
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return True


def cache_key(key_of: Callable[[dict[str, Any]], str]) -> Callable[..., str | None]:
    """A Prefect cache_key_fn from a function of the task's parameters.

    Bad input makes no key (rather than a logged traceback): the task then runs and reports
    the problem itself, once, with its own message.
    """

    def key_fn(context, parameters: dict[str, Any]) -> str | None:
        try:
            return key_of(parameters)
        except LlmshipError:
            return None

    return key_fn


def fresh_dir(path: Path) -> Path:
    """An empty directory at path: what a crashed earlier attempt left there is discarded."""
    shutil.rmtree(path, ignore_errors=True)
    path.with_name(path.name + ".manifest.json").unlink(missing_ok=True)
    path.mkdir(parents=True)
    return path


def artifact_key(model: str, stage: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{model}-{stage}".lower()).strip("-")


def record_stage_artifact(
    model: str,
    output: StageOutput,
    rows: dict[str, Any],
    description: str,
    label: str | None = None,
) -> None:
    """A keyed table per stage and model: the UI then shows each stage's history per model."""
    table = [
        {"field": k, "value": str(v)}
        for k, v in {
            "stage": output.stage,
            "key": output.key,
            "store": output.prefix,
            "content sha256": output.digest,
            "files": output.files,
            "bytes": output.bytes,
            **rows,
        }.items()
    ]
    create_table_artifact(
        table=table, key=artifact_key(model, label or output.stage), description=description
    )


def record_markdown(model: str, stage: str, markdown: str, description: str) -> None:
    create_markdown_artifact(
        markdown=markdown, key=artifact_key(model, stage), description=description
    )


@contextmanager
def model_slot(
    purpose: str, model: str, timeout_s: float, lease_s: float = 300.0
) -> Iterator[None]:
    """One run at a time holds a model's slot for a purpose: Prefect's global concurrency
    limit `llmship-<purpose>-<model>` (one slot, made on first use, visible in the UI). A run
    whose host dies gives it back when its lease (renewed while it runs) runs out."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    name = artifact_key(f"llmship-{purpose}", model)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )
            except Exception:  # noqa: BLE001 - made meanwhile by another run: the same limit
                client.read_global_concurrency_limit_by_name(name)
    log = get_run_logger()
    log.info(
        "taking %s's %s slot (%s): another run %s it goes first",
        model,
        purpose,
        name,
        "evaluating or serving" if purpose == "serving" else "building",
    )
    started = time.monotonic()
    # A transient Prefect outage while the slot is held must not kill an evaluation.
    with concurrency(
        name,
        occupy=1,
        strict=True,
        lease_duration=lease_s,
        timeout_seconds=timeout_s,
        raise_on_lease_renewal_failure=False,
    ):
        if time.monotonic() - started > 1:
            log.info("got %s's %s slot after %.0f s", model, purpose, time.monotonic() - started)
        yield


def build_slot(model: str) -> AbstractContextManager[None]:
    """One run at a time builds a model. Two runs of the same config at once made the same
    stage outputs side by side: twice the GPU time, and the second upload of an output whose
    bytes differ (calibration is not bit-for-bit repeatable) failed with VersionConflict, or
    overwrote files the first one's manifest lists. In turn, the second finds each output
    made (Prefect's cache, or the store: produce)."""
    # A one-minute lease: the rerun after a host died mid-calibration waits that long at most.
    return model_slot("build", model, get_settings().build_slot_timeout_s, lease_s=60.0)


def serving_slot(model: str) -> AbstractContextManager[None]:
    """One run at a time evaluates or serves a model: the gate's evaluation servers and a
    rollout's are the model's, and two runs interleaving them stop each other's."""
    settings = get_settings()
    return model_slot(
        "serving",
        model,
        settings.serving_slot_timeout_s,
        lease_s=settings.serving_slot_lease_s,
    )


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger inside a flow run; llmship's own outside one (a stage called as a
    function, from a script or a test)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("llmship")


def produce(inputs: StageInputs, output: type[Output], make: Callable[[Path], Made]) -> Output:
    """The one way a content-addressed stage makes its output:

        key (the digest of the inputs) -> in the store already? (another run or host made
        it: use it) -> a fresh directory -> make -> manifest (recording the inputs) -> store

    make(out_dir) writes the output's files and returns (details, timings in seconds)."""
    store = ArtifactStore(get_settings())
    prefix = inputs.prefix
    if manifest := store.read_manifest(prefix):
        stage_logger().info(
            "s3://%s/%s is in the store already (made %s): using it",
            store.bucket,
            prefix,
            manifest.created_at,
        )
        return output.from_manifest(prefix, manifest)
    out_dir = fresh_dir(store.local_path(prefix))
    details, timings = make(out_dir)
    manifest = store.store_output(
        out_dir,
        prefix,
        Manifest(
            kind=inputs.stage,
            key=inputs.key,
            inputs=inputs.model_dump(mode="json"),
            tool_versions=inputs.tools,
            timings_s={k: round(v, 3) for k, v in timings.items()},
            details=details.model_dump(mode="json"),
        ),
    )
    return output.from_manifest(prefix, manifest)


def store_report(
    stage: str,
    key: str,
    report: R,
    markdown: str,
    manifest: Manifest,
    extra: dict[str, str] | None = None,
) -> tuple[str, R | None]:
    """Keep a gate's report in the store under stages/<stage>/<key>/, failing ones too: they
    are what people read. Returns (prefix, the report stored there before, if the same inputs
    were judged before: a failed gate run again after its alert). extra: more files, by name."""
    store = ArtifactStore(get_settings())
    prefix = f"stages/{stage}/{key}"
    out = fresh_dir(store.local_path(prefix))
    (out / f"{stage}-report.json").write_text(report.model_dump_json(indent=2))
    (out / f"{stage}-report.md").write_text(markdown)
    for name, text in (extra or {}).items():
        (out / name).write_text(text)
    try:
        store.store_output(out, prefix, manifest.model_copy(update={"kind": stage, "key": key}))
    except VersionConflict:
        earlier = store.get_json(f"{prefix}/files/{stage}-report.json")[0]
        return prefix, type(report).model_validate(earlier)
    return prefix, None
