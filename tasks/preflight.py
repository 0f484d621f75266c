"""Stage 0, preflight: can this machine run this deployment? Asked before any download or
GPU time is spent, and by `llmship plan DEPLOYMENT` ahead of a run.

What it checks, each a refusal with what to do:
    GPUs          count (tensor parallel size, twice over while a live version keeps serving
                  or for the performance gate's baseline and candidate),
                  memory per GPU for serving (weights + one full-length sequence's KV cache +
                  overhead), memory in all for the calibration peak, compute capability for
                  FP8 W8A8 (8.9 and up: Ada, Hopper).
    disk          free space for the snapshot, the calibrated checkpoint and the builds.
    Hugging Face  a token where the repository is gated; the repository and revision exist.
    S3            the artifacts bucket takes a write (and the probe is deleted).
    environments  the quantizer, lm-eval and the serving engine import in their environments.
The estimates and the GPU and disk arithmetic are tasks/plan.py; this module reads the model's
config.json, asks the services, and is the Prefect task.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import uuid
from pathlib import Path

from prefect import get_run_logger, task

from llmship.errors import PreflightFailed, SourceNotFound
from llmship.gpus import Gpu, detect_gpus
from llmship.pipeline_config import PipelineConfig
from llmship.settings import Settings, get_settings
from serving.engines import engine_for
from tasks.common import record_markdown
from tasks.plan import (
    GIB,
    Check,
    ModelShape,
    Plan,
    check_gpu_presence,
    check_resources,
    estimate_stages,
    fitted_serving,
    render,
)
from tasks.plan_gpus import trials_at_once, trials_detail


def read_model_config(source: str, settings: Settings, *, offline: bool = False) -> dict:
    """config.json of the source, without downloading the weights (hub: one small file).
    offline: from the local hub cache only, with no network call at all."""
    if source.startswith("hf://"):
        from huggingface_hub import hf_hub_download

        from llmship.hub import hub_errors, hub_offline, split_hf

        repo, revision = split_hf(source)
        offline = offline or hub_offline()
        with hub_errors(repo, revision, "config.json", offline=offline):
            return json.loads(
                Path(
                    hf_hub_download(
                        repo, "config.json", revision=revision, local_files_only=offline
                    )
                ).read_text()
            )
    if source.startswith("s3://"):
        from llmship.store import ArtifactStore, parse_s3_uri

        bucket, prefix = parse_s3_uri(source)
        found = ArtifactStore(settings).get_json(f"{prefix.rstrip('/')}/config.json", bucket)
        if found is None:
            raise SourceNotFound(f"{source}/config.json does not exist")
        return found[0]
    path = Path(source) / "config.json"
    if not path.exists():
        raise SourceNotFound(f"{path} does not exist: give a model directory")
    return json.loads(path.read_text())


# ------------------------------------------------------------------ the plan


def check_hub_access(source: str) -> Check:
    if not source.startswith("hf://"):
        return Check(name="Hugging Face", ok=None, detail="not a hub source")
    from huggingface_hub import HfApi, get_token

    from llmship.errors import HubUnreachable, LlmshipError
    from llmship.hub import hub_errors, split_hf

    repo, revision = split_hf(source)
    try:
        with hub_errors(repo, revision, "the repository", offline=False):
            info = HfApi().model_info(repo, revision=revision, token=get_token())
    except HubUnreachable:
        return Check(
            name="Hugging Face", ok=None, detail="hub not reachable from here: not checked"
        )
    except LlmshipError as exc:
        return Check(name="Hugging Face", ok=False, detail=str(exc))
    except OSError as exc:
        return Check(
            name="Hugging Face",
            ok=None,
            detail=f"hub not reachable from here ({type(exc).__name__}): not checked",
        )
    return Check(
        name="Hugging Face",
        ok=True,
        detail=f"{repo}@{revision} reachable"
        + (" (gated; the token has access)" if info.gated else ""),
    )


def check_store(settings: Settings) -> Check:
    from botocore.exceptions import BotoCoreError, ClientError

    from llmship.errors import LlmshipError
    from llmship.store import ArtifactStore

    key = f"preflight/{uuid.uuid4().hex}"
    where = f"s3://{settings.s3.artifacts_bucket} at {settings.s3_url}"
    try:
        store = ArtifactStore(settings)
        # Asked first, without side effects: some stores (SeaweedFS) create a bucket on the
        # first write to it, which would hide a misspelt bucket name.
        store.client.head_bucket(Bucket=store.bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
            return Check(
                name="S3",
                ok=False,
                detail=f"cannot write to {where}: NoSuchBucket: "
                "create it, or set LLMSHIP_ARTIFACTS_BUCKET to the bucket to use",
            )
    except (LlmshipError, BotoCoreError) as exc:
        return Check(
            name="S3", ok=False, detail=f"cannot write to {where}: {type(exc).__name__}: {exc}"
        )
    try:
        store.client.put_object(Bucket=store.bucket, Key=key, Body=b"preflight")
        store.client.delete_object(Bucket=store.bucket, Key=key)
    except (LlmshipError, BotoCoreError, ClientError) as exc:
        return Check(
            name="S3", ok=False, detail=f"cannot write to {where}: {type(exc).__name__}: {exc}"
        )
    return Check(name="S3", ok=True, detail=f"{where} takes writes")


def overwrites_denied_by(policy: dict, bucket: str) -> bool:
    """Whether a bucket policy denies every PutObject under versions/ that does not carry
    If-None-Match (so a published key can be written once, never replaced)."""

    def as_list(value) -> list:
        return value if isinstance(value, list) else [value]

    key = f"arn:aws:s3:::{bucket}/versions/any-model/any-version/manifest.json"
    for statement in as_list(policy.get("Statement", [])):
        actions = as_list(statement.get("Action", []))
        null = statement.get("Condition", {}).get("Null", {})
        if (
            statement.get("Effect") == "Deny"
            and any(a in ("s3:PutObject", "s3:*", "*") for a in actions)
            and any(fnmatch.fnmatchcase(key, r) for r in as_list(statement.get("Resource", [])))
            and str(null.get("s3:if-none-match", "")).lower() == "true"
        ):
            return True
    return False


def check_published_immutable(settings: Settings) -> Check:
    """Does the bucket itself keep published versions from being replaced? (llmship writes
    them only with If-None-Match; this asks whether anyone else with write access can.)
    Reported, never refused: a team may accept its own writers' discipline."""
    from botocore.exceptions import BotoCoreError, ClientError

    from llmship.store import ArtifactStore

    name, bucket = "published versions", settings.s3.artifacts_bucket
    advice = (
        "apply the bucket policy in docs/SECURITY.md (deny s3:PutObject on versions/* "
        "without If-None-Match), or create the bucket with S3 Object Lock"
    )
    client = ArtifactStore(settings).client

    def error_code(exc: Exception) -> str:
        return (
            exc.response.get("Error", {}).get("Code", "?")
            if isinstance(exc, ClientError)
            else type(exc).__name__
        )

    try:
        lock = client.get_object_lock_configuration(Bucket=bucket)
        lock_state = lock.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled", "off")
    except (ClientError, BotoCoreError) as exc:
        lock_state = error_code(exc)
    if lock_state == "Enabled":
        return Check(
            name=name,
            ok=True,
            detail=f"s3://{bucket} has Object Lock: every written "
            "version of a key is kept, an overwrite destroys nothing",
        )
    try:
        policy = json.loads(client.get_bucket_policy(Bucket=bucket)["Policy"])
    except (ClientError, BotoCoreError, ValueError, KeyError) as exc:
        policy, policy_state = None, error_code(exc)
    if policy is not None and overwrites_denied_by(policy, bucket):
        return Check(
            name=name,
            ok=True,
            detail=f"s3://{bucket}'s policy denies overwrites under versions/ (s3:if-none-match)",
        )
    seen = f"Object Lock: {lock_state}; bucket policy: " + (
        "denies no overwrite" if policy is not None else policy_state
    )
    unreadable = "AccessDenied" in seen and (
        "; these credentials may not read the bucket's settings (grant "
        "s3:GetBucketObjectLockConfiguration and s3:GetBucketPolicy to check)"
    )
    return Check(
        name=name,
        ok=None,
        detail=f"s3://{bucket} does not deny overwrites under "
        f"versions/ ({seen}){unreadable or ''}; only llmship's own code keeps "
        f"published versions immutable: {advice}",
    )


def importable(python: Path, modules: list[str]) -> list[str] | None:
    """The modules that python cannot find; None if there is no such python."""
    if not python.exists():
        return None
    code = (
        "import importlib.util, sys\n"
        "print(','.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"
    )
    out = subprocess.run([str(python), "-c", code, *modules], capture_output=True, text=True)
    return [m for m in out.stdout.strip().split(",") if m]


def check_environments(config: PipelineConfig, settings: Settings) -> list[Check]:
    quantizer = config.target.quantizer
    engine = engine_for(config.target)
    # Each environment, what it must import, and what to fix when it is missing.
    wanted = [
        ("quantize", settings.stages.quantize_python, [quantizer, "lm_eval"], "`make setup`"),
        (
            f"serving ({config.target.value})",
            engine.python(settings),
            [engine.module],
            engine.python_setting,
        ),
    ]
    checks = []
    for label, python, modules, setting in wanted:
        missing = importable(python, modules)
        if missing is None:
            checks.append(
                Check(
                    name=f"{label} environment",
                    ok=False,
                    detail=f"{python} does not exist: {setting}",
                )
            )
        else:
            checks.append(
                Check(
                    name=f"{label} environment",
                    ok=not missing,
                    detail=f"{python}: "
                    + (
                        f"{', '.join(modules)} import"
                        if not missing
                        else f"{', '.join(missing)} missing ({setting})"
                    ),
                )
            )
    return checks


def plan(
    config: PipelineConfig,
    settings: Settings,
    gpus: list[Gpu] | None = None,
    free_disk_gib: float | None = None,
    check_services: bool = True,
) -> Plan:
    """Every check, with the estimates, of the deployment's first recipe; each other recipe
    of its search checked against this machine as well (the services once), and how many of
    them are tried at once. Raises SourceNotFound when the model's config.json cannot be read
    (nothing else can be estimated without it)."""
    gpus = detect_gpus() if gpus is None else gpus
    no_gpus = check_gpu_presence(config, gpus, settings.device)
    if no_gpus is not None:
        # Before the hub is asked: without GPUs nothing else about this worker matters.
        raise PreflightFailed(
            f"{config.name} cannot run on this worker; nothing was downloaded:\n"
            f"- {no_gpus.name}: {no_gpus.detail}\n"
            "(`llmship plan DEPLOYMENT --gpus N` plans for a GPU host from here)"
        )
    if free_disk_gib is None:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        free_disk_gib = shutil.disk_usage(settings.state_dir).free / GIB
    first, live = plan_recipe(
        config.for_recipe(config.calibration), settings, gpus, free_disk_gib, check_services
    )
    for recipe in config.search:
        other, _ = plan_recipe(config.for_recipe(recipe), settings, gpus, free_disk_gib, False)
        for refusal in other.refusals:
            named = refusal.model_copy(update={"name": f"{refusal.name} ({recipe.describe()})"})
            if named.detail not in {c.detail for c in first.refusals}:
                first.checks.append(named)
    first.checks.append(
        Check(
            name="recipe search", ok=True, detail=trials_detail(config, gpus, settings.device, live)
        )
    )
    first.trials_at_once = trials_at_once(config, gpus, settings.device, live)
    return first


def plan_recipe(
    config: PipelineConfig,
    settings: Settings,
    gpus: list[Gpu],
    free_disk_gib: float,
    check_services: bool,
) -> tuple[Plan, bool]:
    """The plan of a deployment of one recipe, and whether a version of it is live."""
    from llmship.store import ArtifactStore

    shape = ModelShape.from_config(
        read_model_config(config.source, settings, offline=not check_services)
    )
    live = False
    checks: list[Check] = []
    if check_services:
        checks.append(check_store(settings))
        if checks[-1].ok:
            live = ArtifactStore(settings).read_alias(config.name, "live") is not None
            checks.append(check_published_immutable(settings))
        checks.append(check_hub_access(config.source))
        checks += check_environments(config, settings)
    checks = (
        check_resources(config, shape, gpus, settings.device, free_disk_gib, live, settings)
        + checks
    )
    plan_ = Plan(
        model=config.name,
        source=config.source,
        billions=round(shape.billions, 2),
        stages=estimate_stages(config, shape),
        checks=checks,
        serving=fitted_serving(config, gpus, settings.device),
    )
    return plan_, live


# ------------------------------------------------------------------ the Prefect task


def preflight(config: PipelineConfig) -> Plan:
    """The plan, or the refusal of a deployment this machine cannot run."""
    plan_ = plan(config, get_settings())
    if plan_.refusals:
        raise PreflightFailed(
            f"{config.name} cannot run on this worker; nothing was downloaded:\n"
            + "\n".join(f"- {c.name}: {c.detail}" for c in plan_.refusals)
        )
    return plan_


@task(name="preflight")
def preflight_task(config: PipelineConfig) -> Plan:
    """Not cached, not retried: it reads the machine as it is now."""
    plan_ = preflight(config)
    text = render(plan_, config)
    get_run_logger().info("preflight passed:\n%s", text)
    record_markdown(config.name, "preflight", f"```\n{text}\n```", "preflight passed")
    return plan_
