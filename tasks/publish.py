"""Stage 5, publish: the gated build becomes an immutable version in S3.

    versions/<model>/<version>/files/...        server-side copies of the build's files
    versions/<model>/<version>/gate-report.json  the gate's numbers, and gate-report.md to read
    versions/<model>/<version>/perf-report.json  the performance gate's, and perf-report.md
    versions/<model>/<version>/candidates.json   the recipe search that picked it (.md, .svg)
    versions/<model>/<version>/manifest.json    with If-None-Match: "*"
    versions/<model>/<version>/signature.sig    last: every object above, signed

The version id is the build's content digest: the same build is the same version, and
publishing it again finds it already there (and signs it, if it is this build and no trusted
key signed it). Until the manifest exists, the version does not: a publish that dies halfway
leaves files nobody lists or serves; until it is signed (llmship/signing.py), nothing serves
it. What a version's manifest holds, and how it is read back, is llmship/versions.py.
"""

from __future__ import annotations

import time

from prefect import get_run_logger, task

from llmship import forms
from llmship.contracts import Build, StageOutput
from llmship.errors import GateFailed, PerfGateFailed, SignatureRefused
from llmship.manifest import Manifest
from llmship.settings import get_settings
from llmship.store import ArtifactStore, version_prefix
from llmship.versions import PublishedVersion, VersionDetails, VersionInputs, sign_version
from tasks.choose import Choice
from tasks.choose_rule import CandidatesReport, svg_chart
from tasks.choose_rule import render_markdown as render_candidates
from tasks.common import (
    RETRIES,
    RETRY_DELAYS,
    cache_key,
    record_stage_artifact,
    retry_unless_permanent,
)
from tasks.gate_rule import GateReport, render_markdown
from tasks.perf_rule import PerfReport
from tasks.perf_rule import render_markdown as render_perf


def publish(
    model: str,
    build: Build,
    report: GateReport,
    perf: PerfReport | None = None,
    candidates: CandidatesReport | None = None,
) -> PublishedVersion:
    if not report.passed:
        raise GateFailed(f"refusing to publish {build.prefix}: its gate report did not pass")
    if perf is not None and not perf.passed:
        raise PerfGateFailed(
            f"refusing to publish {build.prefix}: its performance report did not pass"
        )
    store = ArtifactStore(get_settings())
    prefix = version_prefix(model, build.version)
    manifest = store.read_manifest(prefix) or write_version(
        store, model, build, report, perf, candidates
    )
    if (
        manifest.digest != build.digest
        or VersionDetails.model_validate(manifest.details).serve != build.details.serve
    ):
        # The version id is the build's digest, which anyone can compute: a manifest someone
        # put there first is signed only if it serves what this run built and gated.
        raise SignatureRefused(
            f"{prefix} holds a manifest this run did not write, whose files or engine "
            f"settings differ from {build.prefix}'s: not signed, not served. Delete "
            f"{prefix}/ (admin) and run again"
        )
    signed_by = sign_version(store, model, build.version)
    return PublishedVersion.from_manifest(model, manifest).model_copy(
        update={"signed_by": signed_by}
    )


def write_version(
    store: ArtifactStore,
    model: str,
    build: Build,
    report: GateReport,
    perf: PerfReport | None,
    candidates: CandidatesReport | None,
) -> Manifest:
    """The version's files (server-side copies of the build's), its reports, then its
    manifest: once that exists, the version does."""
    version = build.version
    prefix = version_prefix(model, version)
    started = time.monotonic()
    source = store.read_manifest(build.prefix)
    for entry in source.files:
        # The managed copy: S3's single CopyObject stops at 5 GiB, a 70B shard can pass it.
        store.client.copy(
            {"Bucket": store.bucket, "Key": f"{build.prefix}/files/{entry.path}"},
            store.bucket,
            f"{prefix}/files/{entry.path}",
            Config=store.transfer,
        )
    store.put_json(f"{prefix}/gate-report.json", report.model_dump(mode="json"))
    store.put_text(f"{prefix}/gate-report.md", render_markdown(model, report))
    if perf is not None:
        store.put_json(f"{prefix}/perf-report.json", perf.model_dump(mode="json"))
        store.put_text(f"{prefix}/perf-report.md", render_perf(model, perf))
    if candidates is not None:
        store.put_json(f"{prefix}/candidates.json", candidates.model_dump(mode="json"))
        store.put_text(f"{prefix}/candidates.md", render_candidates(candidates))
        store.put_text(f"{prefix}/candidates.svg", svg_chart(candidates), "image/svg+xml")
    inputs = VersionInputs(
        build=build.prefix,
        build_digest=build.digest,
        gate_report=f"{prefix}/gate-report.json",
        perf_report=f"{prefix}/perf-report.json" if perf else None,
        candidates_report=f"{prefix}/candidates.json" if candidates else None,
    )
    details = VersionDetails(
        model=model,
        version=version,
        gate_passed=report.passed,
        # None where no limit judged it: "measured" is not "passed".
        perf_passed=perf.passed if perf and perf.judged else None,
        scheme=build.details.scheme.value,
        recipe=candidates.winner_recipe if candidates else None,
        calibration_data=candidates.calibration_data if candidates else {},
        precision=build.details.precision,
        serve=build.details.serve,
        gate={
            t.task: {"baseline": t.baseline, "candidate": t.candidate, "threshold": t.threshold}
            for t in report.tasks
        },
        perf={
            f"{v.load} {v.metric}": {
                "baseline": v.baseline,
                "candidate": v.candidate,
                "limit": v.limit,
            }
            for v in perf.verdicts
        }
        if perf
        else None,
    )
    return store.commit_manifest(
        prefix,
        Manifest(
            kind="version",
            key=version,
            inputs=inputs.model_dump(mode="json"),
            details=details.model_dump(mode="json"),
            timings_s={"publish": round(time.monotonic() - started, 3)},
            files=source.files,
        ),
    )


@task(
    name="publish",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retry_unless_permanent,
    persist_result=True,
    cache_key_fn=cache_key(
        lambda p: f"publish-signed-{p['model']}-{p['choice'].winner.build.version}"
    ),
)
def publish_task(model: str, choice: Choice) -> PublishedVersion:
    """The recipe search's winner, with the comparison that picked it."""
    winner = choice.winner
    published = publish(
        model,
        winner.build,
        winner.gate.report,
        winner.perf.report if winner.perf else None,
        choice.candidates,
    )
    get_run_logger().info(
        "published %s version %s: s3://%s/%s",
        model,
        published.version,
        get_settings().s3.artifacts_bucket,
        published.prefix,
    )
    record_stage_artifact(
        model,
        StageOutput(
            stage="publish",
            key=published.version,
            prefix=published.prefix,
            digest=published.digest,
            files=published.files,
            bytes=published.bytes,
        ),
        {
            "version": published.version,
            "scheme": published.scheme,
            "recipe": choice.candidates.winner_recipe,
            "gate": "passed",
            "performance gate": {None: "off or not judged", True: "passed"}[published.perf_passed],
            "signed by key": (published.signed_by or "")[:16],
        },
        f"{model} version {published.version}, immutable",
    )
    try:
        forms.offer_published_versions(get_settings(), model)
    except Exception as exc:  # noqa: BLE001 - a stale form must not undo a publish
        get_run_logger().warning(
            "the rollback form still lists the versions before %s (%s: %s); `llmship up` "
            "refreshes it",
            published.version,
            type(exc).__name__,
            exc,
        )
    return published
