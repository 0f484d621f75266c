"""Publish and fetch throughput: llmship's store against boto3's transfer manager, side by side.

The same files, the same store, one run: boto3's transfer manager with a tuned
TransferConfig, every file submitted at once (what a hand-written script would do: no
hashing, no manifest) against llmship's `upload_dir` (the upload, hashing each file as it
is read, the manifest last) and
`download_dir` (the download, hashing each file as it is written, every file checked
against the manifest, the rename into place). Both sides use the same part size and
threads (LLMSHIP_S3_PART_MIB, LLMSHIP_S3_MAX_CONCURRENCY). Ratio = boto3's time /
llmship's: 1.0 means llmship's checks cost nothing.

    .venv/orchestrator/bin/python bench/transfer.py [--files 4 --mib 256 --rounds 3]

Needs the stack's S3 (`make up`, or LLMSHIP_* pointing at another store).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from boto3.s3.transfer import create_transfer_manager

from llmship.manifest import Manifest
from llmship.settings import get_settings
from llmship.store import ArtifactStore
from serving import weight_stream

REPO = Path(__file__).resolve().parents[1]
TENSOR_MIB = 32
STREAM = r"""
import json, os, sys, time
from pathlib import Path
from runai_model_streamer import SafetensorsStreamer
from runai_model_streamer_s3.credentials.credentials import S3Credentials
from serving.weight_stream import StreamPlan, verified

plan = StreamPlan.model_validate_json(Path(sys.argv[1]).read_text())
creds = S3Credentials(
    access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
    secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
    region_name=plan.region,
    endpoint=plan.endpoint,
)
for check in sys.argv[2:]:
    started, total = time.perf_counter(), 0
    with SafetensorsStreamer() as streamer:
        streamer.stream_files([f.uri for f in plan.files], s3_credentials=creds, device="cpu")
        tensors = streamer.get_tensors()
        for _, t in verified(tensors, plan) if check == "check" else tensors:
            total += t.numel() * t.element_size()
    print(json.dumps({"check": check, "s": time.perf_counter() - started, "bytes": total}))
"""


def write_safetensors(path: Path, mib: int) -> None:
    """mib MiB of random BF16 tensors of TENSOR_MIB each, in the safetensors format (named
    after the file: a model's shards never share a tensor)."""
    count = max(1, mib // TENSOR_MIB)
    size = mib * 1024 * 1024 // count
    header = {
        f"{path.stem}.t{i}": {
            "dtype": "BF16",
            "shape": [size // 2],
            "data_offsets": [i * size, (i + 1) * size],
        }
        for i in range(count)
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _ in range(count):
            f.write(os.urandom(size))


def stream(settings, plan_path: Path, *checks: str) -> list[float]:
    """Seconds the serve environment's streamer takes to read the plan's files, per check."""
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "AWS_ACCESS_KEY_ID": settings.s3.access_key,
        "AWS_SECRET_ACCESS_KEY": settings.s3.secret_key,
        "AWS_EC2_METADATA_DISABLED": "true",
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
    }
    out = subprocess.run(
        [str(settings.stages.serve_python), "-c", STREAM, str(plan_path), *checks],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"the stream failed ({out.returncode}): {out.stderr[-3000:]}")
    return [json.loads(line)["s"] for line in out.stdout.splitlines() if line.startswith("{")]


def all_at_once(client, config, transfers: list[tuple]) -> None:
    """The tuned baseline: every file through one transfer manager at once, by file name
    (s3transfer reads and writes the parts of a file in parallel), nothing hashed."""
    with create_transfer_manager(client, config) as manager:
        futures = [getattr(manager, op)(*args) for op, *args in transfers]
        for future in futures:
            future.result()


CPU: dict[str, list[float]] = {}


def timed(fn, label: str = "") -> float:
    """Wall time of fn; its CPU time (every thread of this process) is kept under label."""
    started, cpu = time.perf_counter(), time.process_time()
    fn()
    CPU.setdefault(label, []).append(time.process_time() - cpu)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    store = ArtifactStore(get_settings())
    client, bucket, tuned = store.client, store.bucket, store.transfer
    work = Path(tempfile.mkdtemp(prefix="llmship-bench-transfer-"))
    src = work / "src"
    src.mkdir()
    for i in range(args.files):
        write_safetensors(src / f"model-{i:05d}.safetensors", args.mib)
    total_mib = args.files * args.mib
    names = sorted(p.name for p in src.iterdir())
    print(
        f"{args.files} files, {total_mib} MiB, {args.rounds} rounds; "
        f"store {store.settings.s3_url}; "
        f"transfer config (both): part {tuned.multipart_chunksize >> 20} MiB, "
        f"{tuned.max_concurrency} threads"
    )
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "boto3 upload",
            "llmship upload",
            "boto3 fetch",
            "llmship fetch",
            "llmship stream",
            "llmship stream + check",
        )
    }
    try:
        for r in range(args.rounds):
            raw, ours = f"bench/transfer/{r}/raw", f"bench/transfer/{r}/llmship"
            rows["boto3 upload"].append(
                timed(
                    lambda: all_at_once(
                        client,
                        tuned,
                        [("upload", str(src / n), bucket, f"{raw}/files/{n}") for n in names],
                    ),
                    "boto3 upload",
                )
            )
            manifest = Manifest(kind="bench", key=f"transfer-{r}")
            rows["llmship upload"].append(
                timed(lambda: store.upload_dir(src, ours, manifest), "llmship upload")
            )
            plan = weight_stream.plan_for(
                store.read_manifest(ours),
                bucket,
                ours,
                store.settings.s3_url,
                store.settings.s3.region,
                "bench",
            )
            (work / "plan.json").write_text(plan.model_dump_json())
            dest_raw, dest_ours = work / f"raw-{r}", work / f"ours-{r}"
            dest_raw.mkdir()
            rows["boto3 fetch"].append(
                timed(
                    lambda: all_at_once(
                        client,
                        tuned,
                        [
                            ("download", bucket, f"{raw}/files/{n}", str(dest_raw / n))
                            for n in names
                        ],
                    ),
                    "boto3 fetch",
                )
            )
            rows["llmship fetch"].append(
                timed(lambda: store.download_dir(ours, dest_ours), "llmship fetch")
            )
            shutil.rmtree(dest_raw)
            shutil.rmtree(dest_ours)
            plain, checked = stream(store.settings, work / "plan.json", "none", "check")
            rows["llmship stream"].append(plain)
            rows["llmship stream + check"].append(checked)

    finally:
        for key in store.list_keys("bench/transfer/"):
            client.delete_object(Bucket=bucket, Key=key)
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    for k, v in med.items():
        # The streams run in the serve environment's process: their CPU is not this one's.
        cpu = f"this process's CPU {statistics.median(CPU[k]):.2f} s" if k in CPU else ""
        print(
            f"{k:22s} {v:6.2f} s  {total_mib / v:7.0f} MiB/s  (rounds: "
            f"{', '.join(f'{x:.2f}' for x in rows[k])}); {cpu}"
        )
    for what in ("upload", "fetch"):
        print(
            f"{what}: llmship / boto3 throughput = "
            f"{med[f'boto3 {what}'] / med[f'llmship {what}']:.2f}"
            " (target >= 0.90)"
        )
    for what in ("stream", "stream + check"):
        print(
            f"{what} (into memory) against boto3's fetch (to disk): "
            f"{med['boto3 fetch'] / med[f'llmship {what}']:.2f}"
        )


if __name__ == "__main__":
    main()
