"""The local store's process, SeaweedFS, closed to everything but signed S3.

`weed mini` runs a master, a volume server, a filer and the S3 gateway in one process, each
with an HTTP and a gRPC port. Out of the box every one of them reads and writes the buckets
without credentials. Here:

- S3 takes only requests signed by one of three identities (IDENTITIES): the pipeline's
  writer (objects only: no bucket's configuration), a reader for what only serves, and an
  admin that `llmship up` uses to create the buckets. None can change another's rights.
- HTTP is off on the master and the filer (`-disableHttp`); the volume server's reads and
  writes need JWTs signed with keys only this process has (SeaweedFS's `jwt.signing` and
  `jwt.signing.read`; `jwt.filer_signing` too, should the filer's HTTP come back on).
- Every gRPC port takes only clients with a certificate of a CA made for this stack (mutual
  TLS): the tools that speak gRPC to SeaweedFS (`weed shell`, `weed filer.copy`) are refused.
- The process runs with umask 077: its Unix sockets (in /tmp) and data are its owner's only.

SeaweedFS reads security.toml from its working directory: the process starts in
<state>/seaweedfs-security, which holds that file, the CA and the node's key, all mode 600.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
from pathlib import Path

from llmship.processes import write_private
from llmship.settings import S3_IDENTITY_KEY_PREFIX, Settings
from llmship.store import COMPILE_CACHES_PREFIX

# identity -> its SeaweedFS actions (its keys' names: settings.S3_IDENTITY_KEY_PREFIX)
IDENTITIES: dict[str, list[str]] = {
    "admin": ["Admin", "Read", "Write", "List", "Tagging"],
    "writer": ["Read", "List", "Write:*/*"],
    "reader": ["Read", "List"],
}
# Why the writer's Write is "Write:*/*" and it has no Tagging: SeaweedFS checks one coarse
# action per route (weed/s3api/s3api_server.go), and the same "Write" that a PUT of an object
# needs also guards PUT/DELETE ?lifecycle, ?versioning, ?cors and ?object-lock of the bucket
# ("Tagging" guards the bucket's ?tagging). A scoped action is matched against
# "<action>:<bucket>/<key>" (Identity.CanDo in weed/s3api/auth_credentials.go), and a bucket's
# own configuration has no key: its target is "Write:<bucket>", which "*/*" does not match.
# So the writer writes, copies, deletes and uploads in parts (objects and aliases) but changes
# no bucket's configuration; policy, ACL, encryption, public access, ownership, request payment
# and the bucket itself want actions (PutBucketPolicy, WriteAcp, Admin, DeleteBucket) it never
# had. tests/test_host_security.py tries every one.


def identity_actions(settings: Settings) -> dict[str, list[str]]:
    """IDENTITIES, and the one write the reader has: a replica keeps what its engine compiled
    beside its version (serving/compile_cache.py), under the compile caches' prefix only."""
    caches = f"Write:{settings.s3.artifacts_bucket}/{COMPILE_CACHES_PREFIX}/*"
    return {
        name: [*actions, caches] if name == "reader" else actions
        for name, actions in IDENTITIES.items()
    }


# key in the credentials file -> the security.toml table that takes it
JWT_KEYS = {
    "seaweedfs_jwt_write": "jwt.signing",
    "seaweedfs_jwt_read": "jwt.signing.read",
    "seaweedfs_jwt_filer_write": "jwt.filer_signing",
    "seaweedfs_jwt_filer_read": "jwt.filer_signing.read",
}
# Every gRPC service SeaweedFS may start or dial, and the client side.
GRPC_COMPONENTS = (
    "master",
    "volume",
    "filer",
    "s3",
    "admin",
    "worker",
    "msg_broker",
    "msg_agent",
    "mq",
    "client",
)


def new_secrets() -> dict[str, str]:
    """Everything the local store needs that nobody else may know, freshly generated."""
    creds: dict[str, str] = {}
    for name in IDENTITIES:
        prefix = S3_IDENTITY_KEY_PREFIX[name]
        creds[f"{prefix}_access_key"] = f"llmship{name}" + secrets.token_hex(6)
        creds[f"{prefix}_secret_key"] = secrets.token_urlsafe(32)
    for key in JWT_KEYS:
        creds[key] = secrets.token_urlsafe(32)
    return creds


def security_dir(settings: Settings) -> Path:
    return settings.state_dir / "seaweedfs-security"


def _make_tls(folder: Path, host: str) -> None:
    """A CA for this stack and one certificate, signed by it, that every component serves
    and presents as a client."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = {
        "not_valid_before": now - datetime.timedelta(minutes=5),
        "not_valid_after": now + datetime.timedelta(days=3650),
    }
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmship local store CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"])
        .not_valid_after(valid["not_valid_after"])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    node_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    try:
        if ipaddress.ip_address(host) != ipaddress.ip_address("127.0.0.1"):
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    node = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmship-store")]))
        .issuer_name(ca_name)
        .public_key(node_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid["not_valid_before"])
        .not_valid_after(valid["not_valid_after"])
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    write_private(folder / "ca.crt", ca.public_bytes(pem))
    write_private(folder / "node.crt", node.public_bytes(pem))
    write_private(
        folder / "node.key",
        node_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    # The CA's key is not kept: no other certificate can ever be signed for this stack.


def write_config(settings: Settings, creds: dict[str, str]) -> Path:
    """The identities file and security.toml; returns the folder SeaweedFS must start in."""
    folder = security_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    if not (folder / "node.key").exists():
        _make_tls(folder, settings.host)
    write_private(
        folder / "s3-identities.json",
        json.dumps(
            {
                "identities": [
                    {
                        "name": f"llmship-{name}",
                        "credentials": [
                            {
                                "accessKey": creds[f"{S3_IDENTITY_KEY_PREFIX[name]}_access_key"],
                                "secretKey": creds[f"{S3_IDENTITY_KEY_PREFIX[name]}_secret_key"],
                            }
                        ],
                        "actions": actions,
                    }
                    for name, actions in identity_actions(settings).items()
                ]
            }
        ),
    )
    toml = ["[access]", "ui = false"]
    for key, table in JWT_KEYS.items():
        toml += [f"[{table}]", f'key = "{creds[key]}"', "expires_after_seconds = 10"]
    toml += ["[grpc]", f'ca = "{folder / "ca.crt"}"']
    for component in GRPC_COMPONENTS:
        toml += [
            f"[grpc.{component}]",
            f'cert = "{folder / "node.crt"}"',
            f'key = "{folder / "node.key"}"',
        ]
    write_private(folder / "security.toml", "\n".join(toml) + "\n")
    return folder


def argv(settings: Settings, weed: Path) -> list[str]:
    data = settings.state_dir / "seaweedfs"
    data.mkdir(parents=True, exist_ok=True)
    identities = security_dir(settings) / "s3-identities.json"
    p = settings.s3.port
    # weed mini opens a master, a volume server and a filer besides S3; pin all their ports
    # next to the S3 port so two stacks (the demo and the tests) never collide.
    return [
        str(weed),
        "mini",
        f"-dir={data}",
        f"-ip={settings.host}",
        f"-ip.bind={settings.host}",
        "-master.telemetry=false",
        f"-s3.config={identities}",
        "-webdav=false",
        "-admin.ui=false",
        "-disableHttp",
        f"-s3.port={p}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.port.grpc={p + 1}",
        f"-master.port={p + 2}",
        f"-master.port.grpc={p + 3}",
        f"-volume.port={p + 4}",
        f"-volume.port.grpc={p + 5}",
        f"-filer.port={p + 6}",
        f"-filer.port.grpc={p + 7}",
        f"-admin.port={p + 8}",
        f"-admin.port.grpc={p + 9}",
        "-master.volumeSizeLimitMB=1024",
    ]
