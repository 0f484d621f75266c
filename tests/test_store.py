"""The artifact store on the real SeaweedFS: complete-or-absent directories, immutability,
integrity checks and compare-and-swap aliases."""

import hashlib
import os
from pathlib import Path

import pytest

from llmship.errors import IntegrityError, SourceNotFound, VersionConflict
from llmship.manifest import Manifest
from tests.helpers.procs import descendants

pytestmark = pytest.mark.stack


def make_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_round_trip_checks_every_file(store, tmp_path):
    src = make_dir(tmp_path / "src", {"a.bin": b"x" * 1000, "sub/b.txt": b"hello"})
    manifest = store.upload_dir(src, "test/round-trip", Manifest(kind="test", key="k1"))
    assert {f.path for f in manifest.files} == {"a.bin", "sub/b.txt"}
    got = store.download_dir("test/round-trip", tmp_path / "dest")
    assert got.digest == manifest.digest
    assert (tmp_path / "dest" / "sub" / "b.txt").read_bytes() == b"hello"


def test_files_of_many_parts_are_hashed_as_sent_and_checked_as_received(store, tmp_path):
    from llmship.store import ArtifactStore

    # 5 MiB parts (S3's smallest): a 23 MiB file goes up and comes down in five parts at
    # once, read and written in order through the hash.
    small_parts = ArtifactStore(store.settings.updated(s3={"part_mib": 5}))
    data = os.urandom(23 * 1024**2 + 17)
    src = make_dir(tmp_path / "src", {"shard.bin": data, "empty": b""})
    manifest = small_parts.upload_dir(src, "test/parts", Manifest(kind="test", key="k4"))
    sizes = {f.path: (f.size, f.sha256) for f in manifest.files}
    assert sizes == {
        "shard.bin": (len(data), hashlib.sha256(data).hexdigest()),
        "empty": (0, hashlib.sha256(b"").hexdigest()),
    }
    head = store.client.head_object(Bucket=store.bucket, Key="test/parts/files/shard.bin")
    assert head["ETag"].endswith('-5"')  # stored as a multipart object of five parts
    small_parts.download_dir("test/parts", tmp_path / "dest")
    assert (tmp_path / "dest" / "shard.bin").read_bytes() == data
    assert (tmp_path / "dest" / "empty").read_bytes() == b""


def test_no_manifest_means_absent(store, tmp_path):
    src = make_dir(tmp_path / "src", {"a.bin": b"data"})
    store.client.upload_file(str(src / "a.bin"), store.bucket, "test/half/files/a.bin")
    with pytest.raises(SourceNotFound, match="never completely written"):
        store.download_dir("test/half", tmp_path / "dest")


def test_tampered_file_is_refused_and_not_left_behind(store, tmp_path):
    src = make_dir(tmp_path / "src", {"weights.bin": b"\x01" * 4096})
    store.upload_dir(src, "test/tamper", Manifest(kind="test", key="k2"))
    store.client.put_object(
        Bucket=store.bucket, Key="test/tamper/files/weights.bin", Body=b"\x02" * 4096
    )
    with pytest.raises(IntegrityError, match="weights.bin has sha256"):
        store.download_dir("test/tamper", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_published_content_cannot_be_replaced(store, tmp_path):
    first = make_dir(tmp_path / "one", {"a": b"1"})
    second = make_dir(tmp_path / "two", {"a": b"2"})
    m1 = store.upload_dir(first, "test/immutable", Manifest(kind="test", key="v"))
    # The same content again is a no-op that returns the original manifest.
    again = store.upload_dir(first, "test/immutable", Manifest(kind="test", key="v"))
    assert again.created_at == m1.created_at
    with pytest.raises(VersionConflict, match="immutable"):
        store.upload_dir(second, "test/immutable", Manifest(kind="test", key="v"))
    assert store.read_manifest("test/immutable").digest == m1.digest


def test_alias_compare_and_swap(store):
    for version in ("v1", "v2", "v3"):  # an alias names only published versions
        store.commit_manifest(
            f"versions/cas-model/{version}", Manifest(kind="version", key=version)
        )
    store.move_alias("cas-model", "live", "v1")
    store.move_alias("cas-model", "live", "v2")
    assert store.read_alias("cas-model", "live") == "v2"
    _, etag = store.get_json("aliases/cas-model/live.json")
    store.move_alias("cas-model", "live", "v3")
    with pytest.raises(VersionConflict):
        store.put_json("aliases/cas-model/live.json", {"version": "stale"}, if_match=etag)
    assert store.read_alias("cas-model", "live") == "v3"


def test_a_manifest_whose_paths_leave_the_directory_is_refused(store, tmp_path):
    src = make_dir(tmp_path / "src", {"config.json": b"{}"})
    good = store.upload_dir(src, "test/escape", Manifest(kind="test", key="k3"))
    evil = good.model_dump(mode="json")
    evil["files"].append({"path": "../../escaped.sh", "size": 3, "sha256": good.files[0].sha256})
    store.put_json("test/escape/manifest.json", evil)
    dest = tmp_path / "deep" / "er" / "dest"
    with pytest.raises(
        IntegrityError,
        match=r"test/escape/manifest.json is not a manifest "
        r"llmship can trust .*'\.\./\.\./escaped.sh' "
        r"would leave its directory",
    ):
        store.download_dir("test/escape", dest)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["config.json"]


@pytest.mark.parametrize(
    "model, version",
    [
        ("../stages", "v1"),
        ("some-model", "../../x"),
        ("a/b", "v1"),
        ("some-model", ""),
        ("..", "v1"),
    ],
)
def test_names_that_would_leave_their_prefix_are_refused(store, model, version):
    from llmship.errors import UnsafeKey
    from tasks.publish import version_prefix

    with pytest.raises(UnsafeKey, match="cannot name anything in the store"):
        version_prefix(model, version)
    with pytest.raises(UnsafeKey):
        store.move_alias(model, "live", version)
    assert store.list_keys("aliases/some-model/") == [] and store.list_keys("stages/v1") == []


@pytest.mark.parametrize(
    "path", ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a\\b", "a/.", ""]
)
def test_stored_paths_that_would_leave_their_directory_are_refused(path):
    """What download_dir (through the manifest) and download_mirror (for each key) check.
    SeaweedFS itself refuses keys with '.' or '..' segments; AWS S3 stores them."""
    from llmship.errors import UnsafeKey
    from llmship.manifest import inside_path

    with pytest.raises(UnsafeKey, match="would leave its directory"):
        inside_path(path)
    assert inside_path("sub/dir/model-00001-of-00030.safetensors")


def test_a_gate_report_stored_again_for_the_same_inputs_keeps_the_first(store):
    """A failing gate run again (a rerun after the alert) evaluates again: the same verdict
    keeps the stored report; a different one is a conflict worth stopping for."""
    from tasks.gate import store as store_report
    from tasks.gate_rule import GateReport, TaskVerdict

    verdict = TaskVerdict(
        task="clause_type",
        metric="acc",
        n=100,
        baseline=0.9,
        candidate=0.5,
        delta=-0.4,
        rtol=0.05,
        atol=0.0,
        floor=None,
        threshold=0.855,
        measured=0.5,
        passed=False,
    )
    report = GateReport(
        passed=False,
        rule="rtol 0.05",
        rtol=0.05,
        dataset="contracts",
        eval_data_sha256="0" * 64,
        candidate="stages/build/c",
        baseline="stages/build/b",
        tasks=[verdict],
        harness={},
        seconds={"baseline": 1.0, "candidate": 2.0},
    )
    first = store_report("same-inputs", "m", report)
    again = store_report(
        "same-inputs",
        "m",
        report.model_copy(update={"seconds": {"baseline": 3.0, "candidate": 4.0}}),
    )
    assert again == first
    assert store.get_json(f"{first}/files/gate-report.json")[0]["seconds"]["baseline"] == 1.0
    other = report.model_copy(update={"tasks": [verdict.model_copy(update={"candidate": 0.6})]})
    with pytest.raises(VersionConflict, match="gave a different verdict on the same builds"):
        store_report("same-inputs", "m", other)


def test_unsigned_requests_are_refused(stack):
    import httpx

    resp = httpx.get(f"{stack.s3_url}/{stack.s3.artifacts_bucket}?list-type=2")
    assert resp.status_code == 403


def test_no_secret_reaches_a_log_an_artifact_a_command_line_or_an_object(
    first_run, stack, store, prefect_client
):
    """After a build-and-serve run and whatever else the suite ran on this stack (this module
    runs last): the S3 keys, the gateway's admin token and the versions' signing key appear
    in no log file, no flow-run log, no Prefect artifact, no process's command line and no
    text object in the artifacts bucket."""
    import json
    from pathlib import Path

    from prefect.client.schemas.sorting import LogSort

    creds = json.loads(stack.credentials_file.read_text())
    secrets = {
        k: v
        for k, v in creds.items()
        if k.endswith(("_secret_key", "_token", "_auth_string")) or "jwt" in k
    }
    assert len(secrets) >= 8, sorted(secrets)
    # The versions' signing key: a line of its PEM body is enough to find it anywhere.
    pem_lines = stack.signing_key_file.read_text().splitlines()[1:-1]
    secrets["signing key"] = max(pem_lines, key=len)
    assert all(len(v) >= 16 for v in secrets.values())
    places: dict[str, str] = {}
    for path in (stack.state_dir / "logs").rglob("*"):
        if path.is_file():
            places[str(path)] = path.read_text(errors="replace")
    offset = 0
    while logs := prefect_client.read_logs(limit=200, offset=offset, sort=LogSort.TIMESTAMP_ASC):
        places.update({f"flow-run log {log.id}": log.message for log in logs})
        offset += len(logs)
    for artifact in prefect_client.read_artifacts():
        places[f"artifact {artifact.key}"] = json.dumps(artifact.data, default=str)
    for pid in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            places[str(pid)] = pid.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass  # a process that ended meanwhile
    for key in store.list_keys(""):
        if key.endswith((".json", ".md", ".txt", ".yaml")):
            body = store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
            places[f"s3://{store.bucket}/{key}"] = body.decode(errors="replace")
    assert offset > 100 and len(places) > 50, "too little was read to prove anything"
    leaks = [
        (name, where)
        for where, text in places.items()
        for name, secret in secrets.items()
        if secret in text
    ]
    assert leaks == []


def test_every_server_of_the_stack_listens_on_loopback_only(first_run, stack):
    """SeaweedFS, the Prefect server, the gateway, the Ray cluster, the model servers and
    every process they started: each listening socket is on 127.0.0.1 (or ::1), none on all
    interfaces; but for each Ray Serve replica's own gRPC server, which Ray 2.60 opens on
    every interface with its token check (docs/SECURITY.md)."""
    from pathlib import Path

    from llmship import processes

    roots = [r.pid for r in processes.records(stack) if processes.is_alive(r.pid)]
    pids = {*roots, *descendants(*roots)}
    inodes: dict[str, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = fd.readlink().as_posix()
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    # 127.0.0.1, ::1, and 127.0.0.1 as an IPv6-mapped address (Ray's gRPC servers).
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN, one of the stack's
                addr, port = cols[1].split(":")
                listening.append((inodes[cols[9]], addr, int(port, 16)))
    ports = {port for _, _, port in listening}
    assert {stack.s3.port, stack.prefect_port, stack.gateway.port} <= ports, listening

    def name(pid: int) -> str:
        return Path(f"/proc/{pid}/comm").read_text().strip()

    exposed = [(pid, name(pid), port) for pid, addr, port in listening if addr not in loopback]
    assert [e for e in exposed if not e[1].startswith("ray::ServeRepli")] == []
    # The replicas' engines themselves are on loopback.
    engines = [
        port
        for pid, _, port in listening
        if "vllm" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    ]
    assert engines
