"""Stage 5, publish: the gated build becomes an immutable version in S3.

    versions/<model>/<version>/files/...        server-side copies of the build's files
    versions/<model>/<version>/gate-report.json  the gate's numbers, and gate-report.md to read
    versions/<model>/<version>/perf-report.json  the performance gate's, and perf-report.md
    versions/<model>/<version>/manifest.json    last, with If-None-Match: "*"

The version id is the build's content digest: the same build is the same version, and
publishing it again finds it already there. Until the manifest exists, the version does not:
a publish that dies halfway leaves files nobody lists or serves.
"""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from pydantic import BaseModel

from llmship.errors import GateFailed, PerfGateFailed
from llmship.manifest import Manifest
from llmship.settings import get_settings
from llmship.store import MANIFEST, ArtifactStore, key_part, version_prefix
from tasks.common import (
    RETRIES, RETRY_DELAYS, StageOutput, cache_key, record_stage_artifact,
    retry_unless_permanent, version_id,
)
from tasks.gate import GateReport, render_markdown
from tasks.perf import PerfReport
from tasks.perf import render_markdown as render_perf


class PublishedVersion(BaseModel):
    model: str
    version: str
    prefix: str
    digest: str
    files: int
    bytes: int
    gate_passed: bool
    perf_passed: bool | None  # None: the version was published without a performance gate
    scheme: str
    created_at: str

    @classmethod
    def from_manifest(cls, model: str, manifest: Manifest) -> "PublishedVersion":
        """A published version as its manifest in the store describes it."""
        return cls(model=model, version=manifest.key, prefix=version_prefix(model, manifest.key),
                   digest=manifest.digest, files=len(manifest.files),
                   bytes=manifest.total_bytes,
                   gate_passed=bool(manifest.details.get("gate_passed")),
                   perf_passed=manifest.details.get("perf_passed"),
                   scheme=str(manifest.details.get("scheme")), created_at=manifest.created_at)


def publish(model: str, build: StageOutput, report: GateReport,
            perf: PerfReport | None = None) -> PublishedVersion:
    if not report.passed:
        raise GateFailed(f"refusing to publish {build.prefix}: its gate report did not pass")
    if perf is not None and not perf.passed:
        raise PerfGateFailed(f"refusing to publish {build.prefix}: its performance report did "
                             "not pass")
    store = ArtifactStore(get_settings())
    version = version_id(build)
    prefix = version_prefix(model, version)
    started = time.monotonic()
    manifest = store.read_manifest(prefix)
    if manifest is None:
        source = store.read_manifest(build.prefix)
        for entry in source.files:
            # The managed copy: S3's single CopyObject stops at 5 GiB, a 70B shard can pass it.
            store.client.copy(
                {"Bucket": store.bucket, "Key": f"{build.prefix}/files/{entry.path}"},
                store.bucket, f"{prefix}/files/{entry.path}", Config=store.transfer,
            )
        store.put_json(f"{prefix}/gate-report.json", report.model_dump(mode="json"))
        store.put_text(f"{prefix}/gate-report.md", render_markdown(model, report))
        if perf is not None:
            store.put_json(f"{prefix}/perf-report.json", perf.model_dump(mode="json"))
            store.put_text(f"{prefix}/perf-report.md", render_perf(model, perf))
        manifest = Manifest(
            kind="version", key=version,
            inputs={"build": build.prefix, "build_digest": build.digest,
                    "gate_report": f"{prefix}/gate-report.json",
                    **({"perf_report": f"{prefix}/perf-report.json"} if perf else {})},
            details={"model": model, "version": version, "gate_passed": report.passed,
                     "scheme": build.details.get("scheme", "none"),
                     "precision": build.details.get("precision"),
                     "engine_args": build.details.get("engine_args", []),
                     "target": build.details.get("target", "vllm"),
                     "serve_subdir": build.details.get("serve_subdir"),
                     "gate": {t.task: {"baseline": t.baseline, "candidate": t.candidate,
                                       "threshold": t.threshold} for t in report.tasks},
                     "perf_passed": perf.passed if perf else None,
                     "perf": {f"{v.load} {v.metric}": {"baseline": v.baseline,
                                                       "candidate": v.candidate,
                                                       "limit": v.limit}
                              for v in perf.verdicts} if perf else None},
            timings_s={"publish": round(time.monotonic() - started, 3)},
            files=source.files,
        )
        manifest = store.commit_manifest(prefix, manifest)
    return PublishedVersion.from_manifest(model, manifest)


def list_versions(model: str) -> list[Manifest]:
    """Published versions of a model, oldest first: those whose manifest exists."""
    store = ArtifactStore(get_settings())
    manifests = []
    for key in store.list_keys(f"versions/{key_part(model, 'model')}/"):
        if key.endswith(f"/{MANIFEST}") and key.count("/") == 3:
            found = store.read_manifest(key.rsplit("/", 1)[0])
            if found:
                manifests.append(found)
    return sorted(manifests, key=lambda m: m.created_at)


@task(name="publish", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_unless_permanent, persist_result=True,
      cache_key_fn=cache_key(lambda p: f"publish-{p['model']}-{version_id(p['build'])}"))
def publish_task(model: str, build: StageOutput, report: GateReport,
                 perf: PerfReport | None = None) -> PublishedVersion:
    published = publish(model, build, report, perf)
    get_run_logger().info("published %s version %s: s3://%s/%s", model, published.version,
                          get_settings().artifacts_bucket, published.prefix)
    record_stage_artifact(model, StageOutput(
        stage="publish", key=published.version, prefix=published.prefix,
        digest=published.digest, files=published.files, bytes=published.bytes,
    ), {"version": published.version, "scheme": published.scheme, "gate": "passed",
        "performance gate": {None: "off", True: "passed"}[published.perf_passed]},
        f"{model} version {published.version}, immutable")
    return published
