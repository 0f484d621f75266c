"""The artifact store: S3 (SeaweedFS locally, AWS S3 in production) through boto3.

Layout in the artifacts bucket:
    stages/<stage>/<key>/files/...          a stage's output, content-addressed by its inputs
    stages/<stage>/<key>/manifest.json      written last: present means complete
    versions/<model>/<version>/files/...    a published version
    versions/<model>/<version>/gate-report.json
    versions/<model>/<version>/manifest.json  written last, with If-None-Match: immutable
    aliases/<model>/<alias>.json            "live", "previous": moved with If-Match

Files go through boto3's transfer manager (multipart, parallel), each part with a CRC32 that
S3 checks on arrival (the whole file's sha256 is the manifest's: a second SHA256 per part
would cost a second pass over every byte); every download is checked against the manifest
before it is used. Each byte is read once: a file is hashed as the transfer manager reads it
for the upload, and as it writes it on download (both given as streams, so s3transfer reads
and writes them in order).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import ClientError
from pydantic import ValidationError
from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS

from llmship.errors import (
    BadAlias,
    IntegrityError,
    SourceNotFound,
    StackError,
    UnpublishedVersion,
    UnsafeKey,
    VersionConflict,
)
from llmship.hashing_io import HashingReader, HashingWriter
from llmship.manifest import (
    Manifest,
    hash_dir,
    inside_path,
    key_part,
    relative_files,
)
from llmship.serving_messages import Alias, AliasScan
from llmship.settings import Settings

MANIFEST = "manifest.json"
BODY_READ_ATTEMPTS = 5  # as boto3 retries the request itself (standard mode)


def _status(err: ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def version_prefix(model: str, version: str) -> str:
    """Where a published version lives in the artifacts bucket."""
    return f"versions/{key_part(model, 'model')}/{key_part(version, 'version')}"


# Where replicas keep what their engines compiled (serving/compile_cache.py): the one prefix
# the serving identity may write (llmship/seaweedfs.py).
COMPILE_CACHES_PREFIX = "compile-caches"


def shadow_prefix(model: str, version: str) -> str:
    """Where a rollout keeps what it scored of a version's shadow traffic, per step."""
    return f"shadow/{key_part(model, 'model')}/{key_part(version, 'version')}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


class ArtifactStore:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.bucket = settings.s3.artifacts_bucket

    @cached_property
    def transfer(self) -> TransferConfig:
        part = self.settings.s3.part_mib * 1024**2
        return TransferConfig(
            multipart_threshold=part,
            multipart_chunksize=part,
            max_concurrency=self.settings.s3.max_concurrency,
        )

    @cached_property
    def client(self):
        s = self.settings
        if not (s.s3.access_key and s.s3.secret_key):
            raise StackError(
                "no S3 credentials: run `make up` (it generates them into "
                f"{s.credentials_file}) or set LLMSHIP_S3_ACCESS_KEY and LLMSHIP_S3_SECRET_KEY"
            )
        return boto3.client(
            "s3",
            endpoint_url=s.s3_url,
            region_name=s.s3.region,
            aws_access_key_id=s.s3.access_key,
            aws_secret_access_key=s.s3.secret_key,
            config=Config(
                retries={"max_attempts": 5, "mode": "standard"},
                s3={"addressing_style": "path"},
                connect_timeout=5,
                read_timeout=60,
                # One connection per transfer thread: fewer and the threads wait for one.
                max_pool_connections=s.s3.max_concurrency,
            ),
        )

    # ------------------------------------------------------------------ buckets, objects

    def ensure_bucket(self, bucket: str | None = None) -> None:
        bucket = bucket or self.bucket
        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as err:
            if _status(err) != 404:
                raise
            self.client.create_bucket(Bucket=bucket)

    def get_bytes(self, key: str, bucket: str | None = None) -> tuple[bytes, str] | None:
        """(content, ETag), or None where the key does not exist."""
        # botocore retries a failed request, not a body cut off after its headers: read again.
        for attempt in range(1, BODY_READ_ATTEMPTS + 1):
            try:
                obj = self.client.get_object(Bucket=bucket or self.bucket, Key=key)
                return obj["Body"].read(), obj["ETag"]
            except ClientError as err:
                if _code(err) in ("NoSuchKey", "404") or _status(err) == 404:
                    return None
                raise
            except S3_RETRYABLE_DOWNLOAD_ERRORS:
                if attempt == BODY_READ_ATTEMPTS:
                    raise

    def sha256_of(self, key: str) -> str:
        """The sha256 of a stored object, read whole again (in chunks: any size)."""
        h = hashlib.sha256()
        for chunk in self.client.get_object(Bucket=self.bucket, Key=key)["Body"].iter_chunks(
            8 * 1024 * 1024
        ):
            h.update(chunk)
        return h.hexdigest()

    def get_json(self, key: str, bucket: str | None = None) -> tuple[Any, str] | None:
        """(object, ETag), or None where the key does not exist."""
        found = self.get_bytes(key, bucket)
        return (json.loads(found[0]), found[1]) if found else None

    def put_json(
        self, key: str, obj: Any, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        """Write JSON; with if_none_match, only if the key is new; with if_match, only if
        unchanged."""
        extra: dict[str, str] = {}
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        if if_match:
            extra["IfMatch"] = if_match
        try:
            resp = self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=json.dumps(obj, indent=2).encode(),
                ContentType="application/json",
                ChecksumAlgorithm="SHA256",
                **extra,
            )
        except ClientError as err:
            if _status(err) in (409, 412):
                raise VersionConflict(
                    f"s3://{self.bucket}/{key} was written by someone else meanwhile "
                    f"({_code(err)}); read it again and retry"
                ) from err
            raise
        return resp["ETag"]

    def put_text(self, key: str, text: str, content_type: str = "text/markdown") -> None:
        self.client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=text.encode(),
            ContentType=content_type,
            ChecksumAlgorithm="SHA256",
        )

    def list_objects(self, prefix: str, bucket: str | None = None) -> list[dict]:
        """Every object under prefix (all pages): Key, ETag, Size, ..."""
        objects: list[dict] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket or self.bucket, Prefix=prefix):
            objects.extend(page.get("Contents", []))
        return objects

    def list_keys(self, prefix: str, bucket: str | None = None) -> list[str]:
        return [obj["Key"] for obj in self.list_objects(prefix, bucket)]

    # ------------------------------------------------------------------ directories

    def read_manifest(self, prefix: str) -> Manifest | None:
        found = self.read_manifest_bytes(prefix)
        return found[0] if found else None

    def read_manifest_bytes(self, prefix: str) -> tuple[Manifest, bytes] | None:
        """The manifest, and the bytes it was read from (what a version's signature covers)."""
        found = self.get_bytes(f"{prefix}/{MANIFEST}")
        if not found:
            return None
        try:
            return Manifest.model_validate(json.loads(found[0])), found[0]
        except ValidationError as err:
            raise IntegrityError(
                f"s3://{self.bucket}/{prefix}/{MANIFEST} is not a manifest llmship can trust "
                f"({err.error_count()} problem(s); first: {err.errors()[0]['msg']}): nothing "
                "was fetched from it. Whoever can write the bucket changed it; publish the "
                "version again from its build"
            ) from err

    def upload_dir(self, local_dir: Path, prefix: str, manifest: Manifest) -> Manifest:
        """Upload every file under local_dir, then the manifest, last and only if new.

        If a complete copy with the same content is there already (a rerun, or a crash after
        the manifest was written) that copy is kept and its manifest returned.
        """
        existing = self.read_manifest(prefix)
        if existing:
            return self._same_content(
                prefix, existing, manifest.model_copy(update={"files": hash_dir(local_dir)})
            )
        readers = {path: HashingReader(local_dir / path) for path in relative_files(local_dir)}
        try:
            with create_transfer_manager(self.client, self.transfer) as manager:
                uploads = [
                    manager.upload(
                        reader,
                        self.bucket,
                        f"{prefix}/files/{path}",
                        extra_args={"ChecksumAlgorithm": "CRC32"},
                    )
                    for path, reader in readers.items()
                ]
                for upload in uploads:
                    upload.result()
        finally:
            for reader in readers.values():
                reader.close()
        files = [reader.entry(path) for path, reader in readers.items()]
        return self.commit_manifest(prefix, manifest.model_copy(update={"files": files}))

    def commit_manifest(self, prefix: str, manifest: Manifest) -> Manifest:
        """Write the manifest that makes prefix complete; it is never overwritten."""
        try:
            self.put_json(
                f"{prefix}/{MANIFEST}", manifest.model_dump(mode="json"), if_none_match=True
            )
        except VersionConflict:
            return self._same_content(prefix, self.read_manifest(prefix), manifest)
        return manifest

    def _same_content(self, prefix: str, existing: Manifest, new: Manifest) -> Manifest:
        if existing.digest != new.digest:
            raise VersionConflict(
                f"s3://{self.bucket}/{prefix} already holds different content "
                f"(digest {existing.digest[:12]}, this upload {new.digest[:12]}); published "
                "content is immutable: publish under a new version"
            )
        return existing

    def download_dir(self, prefix: str, dest: Path, manifest: Manifest | None = None) -> Manifest:
        """Fetch a complete directory and check every file against its manifest (the one
        given, as its signature was checked, else the stored one)."""
        manifest = manifest or self.read_manifest(prefix)
        if manifest is None:
            raise SourceNotFound(
                f"s3://{self.bucket}/{prefix} has no {MANIFEST}: it does not exist, or was never "
                "completely written"
            )
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        writers = []
        for entry in manifest.files:
            (tmp / entry.path).parent.mkdir(parents=True, exist_ok=True)
            single_get = entry.size < self.transfer.multipart_threshold
            writers.append((entry, HashingWriter(tmp / entry.path, single_get=single_get)))
        try:
            with create_transfer_manager(self.client, self.transfer) as manager:
                downloads = [
                    manager.download(
                        self.bucket, f"{prefix}/files/{entry.path}", writer, subscribers=[writer]
                    )
                    for entry, writer in writers
                ]
                for download in downloads:
                    download.result()
            for entry, writer in writers:
                writer.close()
                writer.check(entry)
        except BaseException:
            for _, writer in writers:
                writer.abandon()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        return manifest

    def local_path(self, prefix: str) -> Path:
        """Where the local copy of a stored directory lives (stages write their output here)."""
        return self.settings.cache_dir / prefix

    def mark_cached(self, prefix: str, manifest: Manifest) -> None:
        """Record that local_path(prefix) holds exactly what the manifest lists."""
        dest = self.local_path(prefix)
        dest.with_name(dest.name + ".manifest.json").write_text(manifest.model_dump_json())

    def materialize(self, prefix: str) -> Path:
        """A verified local copy of a stored directory, fetched only if the cache lacks it."""
        dest = self.local_path(prefix)
        if dest.is_dir() and dest.with_name(dest.name + ".manifest.json").is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.mark_cached(prefix, self.download_dir(prefix, dest))
        return dest

    def store_output(self, local_dir: Path, prefix: str, manifest: Manifest) -> Manifest:
        """Upload a stage's output from its local path, and keep that copy as the cache."""
        manifest = self.upload_dir(local_dir, prefix, manifest)
        if local_dir.resolve() == self.local_path(prefix).resolve():
            self.mark_cached(prefix, manifest)
        return manifest

    # ------------------------------------------------------------------ aliases

    def live_aliases(self) -> dict[str, str]:
        """Every model's live version: {model: version}. Aliases that cannot be read are left
        out (read_live_aliases says which, and why)."""
        return {m: a.version for m, a in self.read_live_aliases().aliases.items()}

    def read_live_aliases(self) -> AliasScan:
        """Every model's `live` alias, each checked on its own: one malformed alias document
        (a careless hand edit, a key that names no model) must not hide the others."""
        scan = AliasScan()
        for key in sorted(self.list_keys("aliases/")):
            parts = key.split("/")
            if not key.endswith("/live.json"):
                continue
            if len(parts) != 3:
                scan.problems[key] = "not an alias key: expected aliases/<model>/live.json"
                continue
            try:
                model = key_part(parts[1], "model")
                alias = self.read_alias_record(model, "live")
            except (UnsafeKey, BadAlias) as exc:
                scan.problems[key] = str(exc)
                continue
            if alias is not None:
                scan.aliases[model] = alias
        return scan

    @staticmethod
    def alias_key(model: str, alias: str) -> str:
        return f"aliases/{key_part(model, 'model')}/{key_part(alias, 'alias')}.json"

    def read_alias_record(self, model: str, alias: str) -> Alias | None:
        """The alias document, checked; None where the alias does not exist."""
        key = self.alias_key(model, alias)
        try:
            found = self.get_json(key)
        except ValueError as exc:  # not JSON, or not UTF-8
            raise BadAlias(self._bad_alias(key, f"not JSON ({exc})")) from exc
        if found is None:
            return None
        try:
            return Alias.model_validate(found[0])
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "the document"
            raise BadAlias(self._bad_alias(key, f"{where}: {first['msg']}")) from exc

    def _bad_alias(self, key: str, problem: str) -> str:
        return (
            f"s3://{self.bucket}/{key} is not an alias llmship can follow ({problem}); "
            "move it again with a rollback (`llmship rollback MODEL --to VERSION`) or delete it"
        )

    def read_alias(self, model: str, alias: str) -> str | None:
        found = self.read_alias_record(model, alias)
        return found.version if found else None

    def is_published(self, model: str, version: str) -> bool:
        """Whether version is a published version of model: its manifest exists and can be
        read as one. An alias may name nothing else."""
        try:
            return self.read_manifest(version_prefix(model, version)) is not None
        except (UnsafeKey, IntegrityError):
            return False

    def move_alias(
        self,
        model: str,
        alias: str,
        version: str,
        reason: str = "",
        *,
        ungated_override: bool = False,
    ) -> None:
        """Point an alias at a version: compare-and-swap, so two rollouts cannot interleave.

        Only a published version can be named: an alias on a version that does not exist is
        a rollback (or a restore) that fails when it is needed. ungated_override records that
        an operator's allow_ungated override put a version without a passing gate there: a
        gateway that starts serves such a version only with that record."""
        key = self.alias_key(model, alias)
        key_part(version, "version")  # a name that would leave its prefix: UnsafeKey first
        if not self.is_published(model, version):
            raise UnpublishedVersion(
                f"{model} has no published version {version!r}: the {alias} alias can name "
                f"only a published one (`llmship versions {model}` lists them)"
            )
        found = self.get_json(key)
        earlier = _named(found[0]) if found else None
        body = Alias(
            model=model,
            alias=alias,
            version=version,
            # What the alias named before, if that is a version (a hand-edited or stale
            # alias may name one that does not exist: never carried on).
            previous=earlier if earlier and self.is_published(model, earlier) else None,
            updated_at=datetime.now(UTC).isoformat(),
            reason=reason,
            ungated_override=ungated_override,
        ).model_dump(mode="json")
        if found:
            self.put_json(key, body, if_match=found[1])
        else:
            self.put_json(key, body, if_none_match=True)

    def list_mirror(self, bucket: str, prefix: str) -> list[tuple[str, str]]:
        """(key, ETag) of every object under s3://bucket/prefix/; a hub mirror has no manifest."""
        try:
            objects = [
                (o["Key"], o["ETag"])
                for o in self.list_objects(prefix + "/", bucket)
                if not o["Key"].endswith("/")
            ]
        except ClientError as err:
            if _code(err) == "NoSuchBucket":
                raise SourceNotFound(f"bucket s3://{bucket} does not exist") from err
            raise
        if not objects:
            raise SourceNotFound(f"s3://{bucket}/{prefix}/ holds no files: check the prefix")
        return sorted(objects)

    def download_mirror(self, bucket: str, prefix: str, dest: Path) -> list[str]:
        """Copy every object under s3://bucket/prefix/ to dest."""
        keys = [key for key, _ in self.list_mirror(bucket, prefix)]
        for key in keys:
            relative = inside_path(key[len(prefix) + 1 :], f"s3://{bucket}/{key}: the path")
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(bucket, key, str(target), Config=self.transfer)
        return keys

    def upload_mirror(self, local_dir: Path, bucket: str, prefix: str) -> None:
        """Put a model directory into a mirror bucket, as a team mirroring hub models would."""
        self.ensure_bucket(bucket)
        for path in relative_files(local_dir):
            self.client.upload_file(
                str(local_dir / path),
                bucket,
                f"{prefix}/{path}",
                ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                Config=self.transfer,
            )


def _named(document: Any) -> str | None:
    """The version an alias document names, if it names one."""
    try:
        return Alias.model_validate(document).version
    except ValidationError:
        return None
