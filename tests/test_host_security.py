"""The local stack as someone else on the host sees it: every port the SeaweedFS process
listens on and the Prefect API, tried without credentials; the store's least-privilege
identities; the state's file modes (issue 14; docs/SECURITY.md, docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from botocore.exceptions import ClientError

from llmship import processes
from llmship.seaweedfs import security_dir
from llmship.stack import as_identity
from llmship.store import ArtifactStore
from tests.helpers.prefect_api import prefect_auth
from tests.helpers.procs import descendants

pytestmark = pytest.mark.stack

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


def listening_ports(pid: int) -> list[int]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return sorted(
        {
            int(line.split()[3].rsplit(":", 1)[1])
            for line in out.splitlines()
            if f"pid={pid}," in line
        }
    )


@pytest.fixture(scope="module")
def weed(stack):
    rec = processes.find(stack, "seaweedfs")
    assert rec, "the stack's SeaweedFS is not running"
    return rec


@pytest.fixture(scope="module")
def creds(stack) -> dict[str, str]:
    return json.loads(stack.credentials_file.read_text())


def test_no_port_of_the_store_reads_or_writes_a_bucket_without_a_signature(
    stack, store, weed, creds
):
    ports = listening_ports(weed.pid)
    # S3, its gRPC, and the master's, volume server's, filer's and admin's HTTP and gRPC.
    assert len(ports) >= 10 and stack.s3.port in ports, ports
    bucket = stack.s3.artifacts_bucket
    store.put_json("test/security/live.json", {"version": "good"})
    attempts = [
        ("PUT", f"/buckets/{bucket}/test/security/live.json"),
        ("POST", f"/buckets/{bucket}/test/security/live.json"),
        ("PUT", f"/{bucket}/test/security/live.json"),
        ("DELETE", f"/buckets/{bucket}/test/security/live.json"),
        ("DELETE", f"/{bucket}/test/security/live.json"),
        ("GET", f"/buckets/{bucket}/test/security/live.json"),
        ("GET", f"/{bucket}/test/security/live.json"),
        ("GET", f"/buckets/{bucket}/?limit=100"),
        ("GET", "/dir/assign"),
        ("POST", "/submit"),
        ("POST", "/3,01637037d6"),
        ("GET", "/col/delete?collection=" + bucket),
        ("GET", "/vol/grow?count=1"),
    ]
    answered: dict[int, int] = {}
    for port in ports:
        for method, path in attempts:
            try:
                resp = httpx.request(
                    method, f"http://{stack.host}:{port}{path}", content=b"pwned", timeout=5
                )
            except httpx.HTTPError:
                continue  # a gRPC port: TLS only, checked below
            answered[port] = answered.get(port, 0) + 1
            assert resp.status_code >= 300, (port, method, path, resp.status_code, resp.text[:200])
    # Every HTTP port was asked (S3, master, volume, filer, admin), not just refused at once.
    assert len(answered) >= 5, answered
    assert store.get_json("test/security/live.json")[0] == {"version": "good"}
    assert store.list_keys("test/security/") == ["test/security/live.json"]


def test_every_grpc_port_wants_a_client_certificate_of_the_stack(stack, weed):
    folder = security_dir(stack)
    grpc_ports = [
        p for p in listening_ports(weed.pid) if p in {stack.s3.port + k for k in (1, 3, 5, 7, 9)}
    ]
    assert len(grpc_ports) == 5, grpc_ports

    def first_frame(port: int, with_certificate: bool) -> bytes:
        context = ssl.create_default_context(cafile=str(folder / "ca.crt"))
        context.set_alpn_protocols(["h2"])
        if with_certificate:
            context.load_cert_chain(folder / "node.crt", folder / "node.key")
        with socket.create_connection((stack.host, port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(H2_PREFACE)
                return tls.recv(64)

    for port in grpc_ports:
        # With the stack's certificate: an HTTP/2 SETTINGS frame (type 4), so the check below
        # is of the certificate and nothing else.
        assert first_frame(port, with_certificate=True)[3] == 4, port
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            if not first_frame(port, with_certificate=False):
                raise ConnectionError("closed")  # closed without a frame: refused too
        with socket.create_connection((stack.host, port), timeout=5) as plain:
            plain.sendall(H2_PREFACE)
            assert not plain.recv(64).startswith(b"\x00\x00"), port  # no plaintext HTTP/2


def test_seaweedfs_own_grpc_tools_cannot_write_the_bucket(stack, store, tmp_path):
    """What an attacker on the host would reach for: `weed filer.copy` straight to the
    filer's gRPC port (from a folder without the stack's security.toml)."""
    store.put_json("test/security/grpc/live.json", {"version": "good"})
    (tmp_path / "live.json").write_text('{"version": "attacker"}')
    filer = f"{stack.host}:{stack.s3.port + 6}.{stack.s3.port + 7}"
    weed_bin = processes.find(stack, "seaweedfs").argv[0]
    proc = subprocess.run(
        [
            weed_bin,
            "filer.copy",
            "live.json",
            f"http://{filer}/buckets/{stack.s3.artifacts_bucket}/test/security/grpc/",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "rpc error" in proc.stdout + proc.stderr, proc
    assert store.get_json("test/security/grpc/live.json")[0] == {"version": "good"}


def test_the_store_s_secrets_and_sockets_are_its_owner_s_only(stack, weed):
    folder = security_dir(stack)
    for path in [stack.credentials_file, *folder.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    sockets = [
        f"/tmp/seaweedfs-{kind}-{port}.sock"
        for kind, port in [
            ("s3", stack.s3.port),
            ("filer", stack.s3.port + 6),
            ("filer-grpc", stack.s3.port + 7),
            ("master-grpc", stack.s3.port + 3),
        ]
    ]
    present = [s for s in sockets if os.path.exists(s)]
    assert present, "SeaweedFS made none of its local sockets: the check proves nothing"
    for path in present:
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, (path, oct(os.stat(path).st_mode))


def test_the_serving_identity_reads_and_writes_only_compile_caches(stack, store, creds):
    reader = ArtifactStore(as_identity(stack, creds, "reader"))
    store.put_json("versions/security-test/v1/manifest.json", {"published": True})
    assert reader.get_json("versions/security-test/v1/manifest.json")[0] == {"published": True}
    assert reader.list_keys("versions/security-test/") == [
        "versions/security-test/v1/manifest.json"
    ]
    attempts = {
        "overwrite a version": lambda: reader.client.put_object(
            Bucket=reader.bucket, Key="versions/security-test/v1/manifest.json", Body=b"{}"
        ),
        "move an alias": lambda: reader.put_json(
            "aliases/security-test/live.json", {"version": "v0"}
        ),
        "delete a version": lambda: reader.client.delete_object(
            Bucket=reader.bucket, Key="versions/security-test/v1/manifest.json"
        ),
        "copy over a version": lambda: reader.client.copy_object(
            Bucket=reader.bucket,
            Key="versions/security-test/v1/manifest.json",
            CopySource={"Bucket": reader.bucket, "Key": "versions/security-test/v1/manifest.json"},
            MetadataDirective="REPLACE",
        ),
        "start a multipart upload": lambda: reader.client.create_multipart_upload(
            Bucket=reader.bucket, Key="versions/security-test/v1/files/x"
        ),
        "make a bucket": lambda: reader.client.create_bucket(Bucket="reader-made-this"),
        "write beside the compile caches": lambda: reader.put_json("compile-caches-x/k", {}),
    }
    for what, attempt in attempts.items():
        with pytest.raises(ClientError, match="AccessDenied"):
            attempt()
            pytest.fail(f"the reader could {what}")
    assert store.get_json("versions/security-test/v1/manifest.json")[0] == {"published": True}
    # Its one write: a replica keeps what its engine compiled (serving/compile_cache.py).
    reader.put_json(
        "compile-caches/security-test/v1/key/record.json", {"ok": 1}, if_none_match=True
    )
    assert store.get_json("compile-caches/security-test/v1/key/record.json")[0] == {"ok": 1}
    # The pipeline's writer cannot make buckets either: only `llmship up` (admin) does.
    with pytest.raises(ClientError, match="AccessDenied"):
        store.client.create_bucket(Bucket="writer-made-this")


def _with_prefix(client, operation: str):
    """A bucket-level request with ?prefix= added and signed: SeaweedFS's auth takes a prefix
    as the object key a scoped action is matched against, where a request names none."""

    def add(request, **_):
        request.url += ("&" if "?" in request.url else "?") + "prefix=versions%2F"

    client.meta.events.register_first(f"before-sign.s3.{operation}", add)
    return add


def test_the_writer_publishes_but_cannot_change_the_bucket_s_configuration(stack, store, creds):
    """The pipeline's writer could set a lifecycle rule that expires versions/, turn versioning
    on, or open CORS (issue 27). Every change of the bucket's configuration is refused to it,
    and what publishing does (a conditional create, parts, a copy, a delete) still works."""
    bucket = store.bucket
    writer = store.client
    lifecycle = {
        "Rules": [
            {
                "ID": "expire",
                "Status": "Enabled",
                "Filter": {"Prefix": ""},
                "Expiration": {"Days": 1},
            }
        ]
    }
    cors = {"CORSRules": [{"AllowedMethods": ["GET", "PUT"], "AllowedOrigins": ["*"]}]}
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
            }
        ],
    }
    attempts = {
        "PutBucketLifecycleConfiguration": lambda: writer.put_bucket_lifecycle_configuration(
            Bucket=bucket, LifecycleConfiguration=lifecycle
        ),
        "DeleteBucketLifecycle": lambda: writer.delete_bucket_lifecycle(Bucket=bucket),
        "PutBucketVersioning": lambda: writer.put_bucket_versioning(
            Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
        ),
        "PutBucketCors": lambda: writer.put_bucket_cors(Bucket=bucket, CORSConfiguration=cors),
        "DeleteBucketCors": lambda: writer.delete_bucket_cors(Bucket=bucket),
        "PutBucketPolicy": lambda: writer.put_bucket_policy(
            Bucket=bucket, Policy=json.dumps(policy)
        ),
        "DeleteBucketPolicy": lambda: writer.delete_bucket_policy(Bucket=bucket),
        "PutObjectLockConfiguration": lambda: writer.put_object_lock_configuration(
            Bucket=bucket, ObjectLockConfiguration={"ObjectLockEnabled": "Enabled"}
        ),
        "PutBucketTagging": lambda: writer.put_bucket_tagging(
            Bucket=bucket, Tagging={"TagSet": [{"Key": "owner", "Value": "attacker"}]}
        ),
        "DeleteBucketTagging": lambda: writer.delete_bucket_tagging(Bucket=bucket),
        "PutBucketAcl": lambda: writer.put_bucket_acl(Bucket=bucket, ACL="public-read-write"),
        "PutBucketEncryption": lambda: writer.put_bucket_encryption(
            Bucket=bucket,
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
            },
        ),
        "PutPublicAccessBlock": lambda: writer.put_public_access_block(
            Bucket=bucket, PublicAccessBlockConfiguration={"BlockPublicAcls": False}
        ),
        "PutBucketOwnershipControls": lambda: writer.put_bucket_ownership_controls(
            Bucket=bucket,
            OwnershipControls={"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]},
        ),
        "PutBucketRequestPayment": lambda: writer.put_bucket_request_payment(
            Bucket=bucket, RequestPaymentConfiguration={"Payer": "Requester"}
        ),
        "DeleteBucket": lambda: writer.delete_bucket(Bucket=bucket),
    }
    allowed = []
    for operation, attempt in attempts.items():
        for with_prefix in (False, True):
            hook = _with_prefix(writer, operation) if with_prefix else None
            try:
                attempt()
                allowed.append(operation + (" ?prefix=" if with_prefix else ""))
            except ClientError as exc:
                status = exc.response["ResponseMetadata"]["HTTPStatusCode"]
                assert status == 403, (operation, with_prefix, exc.response["Error"])
            finally:
                if hook:
                    writer.meta.events.unregister(f"before-sign.s3.{operation}", hook)
    assert not allowed, f"the writer changed the bucket's configuration: {allowed}"
    # The bucket is as `llmship up` made it (read as the admin, which alone may read it all).
    admin = ArtifactStore(as_identity(stack, creds, "admin")).client
    assert "Status" not in admin.get_bucket_versioning(Bucket=bucket)
    for read in (admin.get_bucket_lifecycle_configuration, admin.get_bucket_cors):
        with pytest.raises(ClientError, match="NoSuch"):
            read(Bucket=bucket)

    # Publishing: files in parts (one copied), a conditional create, an alias moved, a delete.
    key = "versions/security-writer/v1"
    upload = writer.create_multipart_upload(Bucket=bucket, Key=f"{key}/files/big")
    part = writer.upload_part(
        Bucket=bucket,
        Key=f"{key}/files/big",
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"w" * (5 * 1024 * 1024),
    )
    store.put_json(f"{key}/files/small.json", {"n": 1})
    copied = writer.upload_part_copy(
        Bucket=bucket,
        Key=f"{key}/files/big",
        UploadId=upload["UploadId"],
        PartNumber=2,
        CopySource={"Bucket": bucket, "Key": f"{key}/files/small.json"},
    )
    writer.complete_multipart_upload(
        Bucket=bucket,
        Key=f"{key}/files/big",
        UploadId=upload["UploadId"],
        MultipartUpload={
            "Parts": [
                {"PartNumber": 1, "ETag": part["ETag"]},
                {"PartNumber": 2, "ETag": copied["CopyPartResult"]["ETag"]},
            ]
        },
    )
    store.put_json(f"{key}/manifest.json", {"published": True}, if_none_match=True)
    from llmship.errors import VersionConflict

    with pytest.raises(VersionConflict):
        store.put_json(f"{key}/manifest.json", {"published": False}, if_none_match=True)
    store.put_json("aliases/security-writer/live.json", {"version": "v1"})
    small = writer.head_object(Bucket=bucket, Key=f"{key}/files/small.json")["ContentLength"]
    store.client.delete_object(Bucket=bucket, Key=f"{key}/files/small.json")
    assert store.list_keys(f"{key}/") == [f"{key}/files/big", f"{key}/manifest.json"]
    size = writer.head_object(Bucket=bucket, Key=f"{key}/files/big")["ContentLength"]
    assert size == 5 * 1024 * 1024 + small
    assert store.get_json("aliases/security-writer/live.json")[0] == {"version": "v1"}
    # Leave no model behind: a starting gateway reports this alias (its manifest is no
    # llmship manifest) on /ready, and later tests expect a clean /ready.
    for gone in ("aliases/security-writer/live.json", f"{key}/manifest.json", f"{key}/files/big"):
        store.client.delete_object(Bucket=bucket, Key=gone)
    assert not store.list_keys(f"{key}/") and not store.list_keys("aliases/security-writer/")


def test_the_gateway_signs_as_the_reader(stack, first_run):
    gateway = processes.find(stack, "gateway")
    environ = dict(
        item.split("=", 1)
        for item in open(f"/proc/{gateway.pid}/environ", "rb").read().decode().split("\0")
        if "=" in item
    )
    assert environ["LLMSHIP_S3_IDENTITY"] == "reader"
    assert "LLMSHIP_S3_SECRET_KEY" not in environ
    # ... and it still routes from the S3 live alias it reads with it.
    assert httpx.get(f"{stack.gateway_url}/ready", timeout=10).status_code == 200


def test_the_preflight_says_whether_the_bucket_itself_keeps_versions_immutable(stack, creds):
    """The local SeaweedFS bucket denies no overwrite by itself: reported (not refused), with
    what to apply. A bucket made with Object Lock is reported as keeping them."""
    from tasks.preflight import check_published_immutable

    check = check_published_immutable(stack)
    assert check.ok is None, check
    assert "does not deny overwrites under versions/" in check.detail
    assert "docs/SECURITY.md" in check.detail
    admin = ArtifactStore(as_identity(stack, creds, "admin"))
    try:
        admin.client.create_bucket(Bucket="llmship-locked", ObjectLockEnabledForBucket=True)
    except ClientError as exc:
        assert "BucketAlreadyOwnedByYou" in str(exc)
    # Read with the admin identity: SeaweedFS lets only it read a bucket's lock settings.
    locked = check_published_immutable(
        admin.settings.updated(s3={"artifacts_bucket": "llmship-locked"})
    )
    assert locked.ok is True and "Object Lock" in locked.detail, locked


def test_the_prefect_api_refuses_callers_without_the_auth_string(stack, prefect_client):
    """Anyone on the host could run rollback/tiny-llama through an open API; now the server
    wants the auth string from the credentials file (Prefect's own basic auth)."""
    deployment = prefect_client.read_deployment_by_name("rollback/tiny-llama")
    api = stack.prefect_api_url
    attempts = [
        (
            "POST",
            f"{api}/deployments/{deployment.id}/create_flow_run",
            {"parameters": {"reason": "attacker"}},
        ),
        ("POST", f"{api}/deployments/filter", {}),
        ("POST", f"{api}/flow_runs/filter", {}),
        ("GET", f"{api}/block_documents/", None),
    ]
    for method, url, body in attempts:
        for auth in (None, ("llmship", "wrong"), ("admin", "pass")):
            resp = httpx.request(method, url, json=body, auth=auth, timeout=10)
            assert resp.status_code == 401, (method, url, auth, resp.status_code)
    assert httpx.get(f"{api}/health", timeout=10).status_code == 200  # probes stay open
    runs = prefect_client.read_flow_runs()
    assert not [r for r in runs if (r.parameters or {}).get("reason") == "attacker"]
    # With it (what every client llmship starts finds in the profile): allowed.
    resp = httpx.post(f"{api}/deployments/filter", json={}, auth=prefect_auth(stack), timeout=10)
    assert resp.status_code == 200 and resp.json()


def test_the_state_folder_is_its_owner_s_only(stack):
    prefect_home = stack.state_dir / "prefect"
    assert stat.S_IMODE(stack.state_dir.stat().st_mode) == 0o700
    for path in (
        prefect_home / "prefect.db",
        prefect_home / "profiles.toml",
        stack.credentials_file,
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def ray_sockets(stack) -> list[str]:
    """`ss` lines of every TCP port the Ray head and its processes listen on, now."""
    head = processes.find(stack, "ray-head")
    assert head, "the stack's Ray head is not running"
    ray_pids = {head.pid, *descendants(head.pid)}
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    lines = []
    for line in out.splitlines():
        if "users:" not in line:
            continue  # a socket ss cannot name a process for: not one of Ray's
        pids = {
            int(p.split("=")[1]) for p in line.split("users:")[1].split(",") if p.startswith("pid=")
        }
        if pids & ray_pids:
            lines.append(line)
    return lines


def test_the_ray_cluster_refuses_clients_without_its_token(stack, first_run):
    """The cluster listens on 127.0.0.1, but for each Serve replica's own gRPC server (on
    every interface, Ray 2.60; docs/SECURITY.md): the cluster token is what keeps others out.
    A client with no token, or a wrong one, cannot join it, deploy, or read it; the
    dashboard's API refuses it too. The token's file, and the folder around Ray's session
    folder (its logs and Unix sockets), are the owner's only."""
    from llmship import ray_cluster

    for line in ray_sockets(stack):
        address = line.split()[3].rsplit(":", 1)[0]
        if address not in ("127.0.0.1", "[::ffff:127.0.0.1]"):
            assert '"ray::ServeRepli' in line, line  # Serve's own, token-checked

    script = (
        f"import ray; ray.init(address={ray_cluster.address(stack)!r}, "
        "log_to_driver=False); print('JOINED')"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    wrong = stack.state_dir / "wrong-token"
    wrong.write_text("0" * 64)
    # No token, and a wrong one: both clients at once (each tries for a while before it gives up).
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env in (
            {**base, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
            {
                **base,
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(wrong),
            },
        )
    ]
    for client in clients:
        stdout, stderr = client.communicate(timeout=180)
        assert client.returncode != 0 and "JOINED" not in stdout
        assert "Authentication" in stderr or "token" in stderr, stderr[-2000:]
    dashboard = f"http://{stack.host}:{stack.ray.port + 1}"
    for path in ("/api/jobs/", "/api/serve/applications/", "/nodes?view=summary"):
        resp = httpx.get(dashboard + path, timeout=10)
        assert resp.status_code in (401, 403), (path, resp.status_code)
    token = open(stack.ray_auth_token_file).read().strip()
    ok = httpx.get(
        dashboard + "/api/serve/applications/",
        timeout=10,
        headers={"authorization": f"Bearer {token}"},
    )
    assert ok.status_code == 200 and "tiny-llama--" in ok.text
    assert stat.S_IMODE(stack.ray_auth_token_file.stat().st_mode) == 0o600
    # Ray makes its session folder everyone's (777): the folder around it is the owner's.
    assert ray_cluster.private_dir(stack) in ray_cluster.temp_dir(stack).parents
    assert stat.S_IMODE(ray_cluster.private_dir(stack).stat().st_mode) == 0o700


# What a client of each of Ray's servers may ask, read-only, with an empty request: the GCS,
# the raylet, the workers, the dashboard agent, the Ray Client server and a Serve replica.
RAY_GRPC_READS = [
    "/ray.rpc.ActorInfoGcsService/GetAllActorInfo",
    "/ray.rpc.ActorInfoGcsService/ListNamedActors",
    "/ray.rpc.JobInfoGcsService/GetAllJobInfo",
    "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",
    "/ray.rpc.WorkerInfoGcsService/GetAllWorkerInfo",
    "/ray.rpc.TaskInfoGcsService/GetTaskEvents",
    "/ray.rpc.PlacementGroupInfoGcsService/GetAllPlacementGroup",
    "/ray.rpc.InternalKVGcsService/InternalKVKeys",
    "/ray.rpc.autoscaler.AutoscalerStateService/GetClusterStatus",
    "/ray.rpc.NodeManagerService/GetNodeStats",
    "/ray.rpc.NodeManagerService/GetObjectsInfo",
    "/ray.rpc.CoreWorkerService/GetCoreWorkerStats",
    "/ray.rpc.LogService/ListLogs",
    "/ray.rpc.RayletDriver/ClusterInfo",
    "/ray.rpc.RayletDriver/ListNamedActors",
    "/ray.serve.ASGIService/HandleRequest",
    "/ray.rpc.ObjectManagerService/Pull",  # of no object: the object manager serves no read
]
# ... and of each HTTP server: the dashboard's, its agent's, the runtime-env agent's, and a
# Prometheus exporter's.
RAY_HTTP_READS = [
    ("GET", "/"),
    ("GET", "/metrics"),
    ("GET", "/api/serve/applications/"),
    ("GET", "/api/jobs/"),
    ("GET", "/api/job_agent/jobs/"),
    ("GET", "/api/v0/actors"),
    ("GET", "/api/v0/logs"),
    ("GET", "/logical/actors"),
    ("GET", "/nodes?view=summary"),
    ("GET", "/api/cluster_status"),
    ("POST", "/get_runtime_envs_info"),
]


def test_no_port_of_the_ray_cluster_names_the_served_builds_without_the_token(stack, first_run):
    """Ray's metrics port (ray.port + 6, a Prometheus exporter) answered anyone on the host
    with every served and evaluated build (issue 27). Every TCP port the Ray processes listen
    on, found now, is asked over HTTP and gRPC without the token: every gRPC server refuses,
    and no HTTP answer names a build. With the token the GCS does (the probe can see one)."""
    import grpc

    from llmship import ray_cluster

    model = "tiny-llama"

    def model_server(line: str) -> bool:
        """A replica's engine (vLLM's OpenAI server): it serves the model without credentials,
        as vLLM does, and is not Ray's (docs/SECURITY.md, "Not covered")."""
        pids = [p.split("=")[1] for p in line.split("users:")[1].split(",") if "pid=" in p]
        cmdlines = []
        for pid in pids:
            try:
                cmdlines.append(open(f"/proc/{pid}/cmdline", "rb").read())
            except OSError:
                continue
        return any(b"vllm.entrypoints" in c or b"trtllm-serve" in c for c in cmdlines)

    every = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ports = sorted(
        {
            int(line.split()[3].rsplit(":", 1)[1])
            for line in ray_sockets(stack)
            if not model_server(line)
        }
        # ... and the drivers' (the gateway's, a flow run's) in the cluster's worker ports
        | {
            port
            for line in every.splitlines()
            if "users:" in line
            and not model_server(line)
            and stack.ray.port
            <= (port := int(line.split()[3].rsplit(":", 1)[1]))
            < stack.ray.port + ray_cluster.WORKER_PORTS[1] + 1
        }
    )
    # The GCS, dashboard, Ray Client, both agents' ports, object manager, raylet, at least.
    assert {stack.ray.port + k for k in (0, 1, 2, 3, 4, 5, 7, 8)} <= set(ports), ports

    def speaks_grpc(port: int) -> bool:
        with grpc.insecure_channel(f"{stack.host}:{port}") as channel:
            try:  # an HTTP/1.1-only server never gets an HTTP/2 connection ready
                grpc.channel_ready_future(channel).result(timeout=3)
                return True
            except grpc.FutureTimeoutError:
                return False

    def grpc_answers(port: int, metadata=()) -> dict[str, bytes | str]:
        answers: dict[str, bytes | str] = {}
        with grpc.insecure_channel(f"{stack.host}:{port}") as channel:
            for method in RAY_GRPC_READS:
                call = channel.unary_unary(method)
                try:
                    answers[method] = call(b"", timeout=3, metadata=metadata)
                except grpc.RpcError as exc:
                    answers[method] = f"{exc.code()} {exc.details()}"
        return answers

    def probe(port: int) -> tuple[str, int, list[str]]:
        """(the protocol that answered, how many reads were asked, what leaked)."""
        if speaks_grpc(port):
            answers = grpc_answers(port)
            # Refused, every one: no answer at all without the token, built or not.
            leaks = [
                f"{port} gRPC {m}: {a[:200]!r}" for m, a in answers.items() if isinstance(a, bytes)
            ]
            if not any(str(a).startswith("StatusCode.UNAUTHENTICATED") for a in answers.values()):
                leaks.append(f"{port} gRPC: none of its methods asked for the token: {answers}")
            return "gRPC", 1, leaks
        leaks, asked = [], 0
        for method, path in RAY_HTTP_READS:
            try:
                resp = httpx.request(method, f"http://{stack.host}:{port}{path}", timeout=5)
            except httpx.HTTPError:
                break  # not HTTP/1.1 either: nothing more to ask there
            asked += 1
            if model in resp.text:
                leaks.append(f"{port} {method} {path}: {resp.status_code} {resp.text[:200]!r}")
        return "HTTP", asked, leaks

    # Every port at once: a port that answers nothing costs its timeouts only once.
    leaks, asked = [], {"gRPC": 0, "HTTP": 0}
    with ThreadPoolExecutor(max_workers=len(ports)) as pool:
        for protocol, reads, port_leaks in pool.map(probe, ports):
            asked[protocol] += reads
            leaks += port_leaks
    assert not leaks, "\n".join(leaks)
    # The GCS, raylet, workers, agent, Ray Client were asked over gRPC; the dashboard, agents,
    # exporters over HTTP.
    assert asked["gRPC"] >= 5 and asked["HTTP"] >= 3 * len(RAY_HTTP_READS), asked

    token = open(stack.ray_auth_token_file).read().strip()
    with_token = grpc_answers(stack.ray.port, metadata=(("authorization", f"Bearer {token}"),))
    answer = with_token["/ray.rpc.ActorInfoGcsService/GetAllActorInfo"]
    assert isinstance(answer, bytes) and model.encode() in answer, answer
