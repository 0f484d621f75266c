"""What signing costs at publish and at load: llmship's way against model_signing's own.

model_signing's API signs a folder: it reads and hashes every file, then signs the statement
of their digests; its verification hashes the folder again. llmship signs the same statement
from the sha256 the publish already has (each file was hashed as it was uploaded), and a
replica checks the signature and the manifest's digests, while its download hashes each file
as it writes it (which it did before signing existed). Both ways, on the same folder, in one
run, alternately:

- sign: model_signing's `signing.Config().use_elliptic_key_signer(...).sign(folder)` against
  llmship.signing.sign(digests);
- verify: model_signing's `verifying.Config().use_elliptic_key_verifier(...).verify(folder)`
  against llmship's signing.verify + check_manifest.

Prints each median, their ratio, and model_signing's hashing rate, from which the time for a
70B BF16 version (141 GB) follows: llmship's does not grow with the version's size.

    .venv/orchestrator/bin/python bench/signing.py [--files 8 --mib 128 --rounds 3]

Needs no stack.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmship import signing  # noqa: E402
from llmship.manifest import FileEntry, hash_dir  # noqa: E402
from llmship.settings import Settings  # noqa: E402

SEVENTY_B_BF16_GB = 141.0


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--mib", type=int, default=128, help="size of each file")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from model_signing import hashing, verifying
    from model_signing import signing as ms_signing

    with tempfile.TemporaryDirectory(prefix="llmship-bench-signing-") as tmp:
        root = Path(tmp)
        settings = Settings(state_dir=root / "state")
        key = signing.ensure_signing_key(settings)
        [public] = signing.trusted_keys(settings).values()
        folder = root / "version"
        (folder / "files").mkdir(parents=True)
        for i in range(args.files):
            with open(folder / "files" / f"model-{i:05d}.safetensors", "wb") as f:
                for _ in range(args.mib):
                    f.write(os.urandom(1024 * 1024))
        manifest = b'{"kind": "version"}'
        (folder / signing.MANIFEST_OBJECT).write_bytes(manifest)
        entries = hash_dir(folder)  # what the publish has: each file hashed at upload
        objects = {e.path: e.sha256 for e in entries}
        files = [
            FileEntry(path=e.path.removeprefix("files/"), size=e.size, sha256=e.sha256)
            for e in entries
            if e.path.startswith("files/")
        ]
        theirs_sig, ours_sig = root / "theirs.sig", root / "ours.sig"
        ms_sign = ms_signing.Config().use_elliptic_key_signer(private_key=key)
        ms_sign.set_hashing_config(
            hashing.Config().use_file_serialization(hashing_algorithm="sha256")
        )
        ms_verify = verifying.Config().use_elliptic_key_verifier(public_key=public)
        trusted = signing.trusted_keys(settings)
        times: dict[str, list[float]] = {
            k: [] for k in ("sign_theirs", "sign_ours", "verify_theirs", "verify_ours")
        }
        for _ in range(args.rounds):
            times["sign_theirs"].append(timed(lambda: ms_sign.sign(folder, theirs_sig)))
            times["sign_ours"].append(
                timed(lambda: ours_sig.write_bytes(signing.sign(key, objects, "version")))
            )
            times["verify_theirs"].append(timed(lambda: ms_verify.verify(folder, ours_sig)))
            times["verify_ours"].append(
                timed(
                    lambda: signing.check_manifest(
                        signing.verify(ours_sig.read_bytes(), trusted, "v"), manifest, files, "v"
                    )
                )
            )
        gb = args.files * args.mib * 1024 * 1024 / 1e9
        medians = {k: statistics.median(v) for k, v in times.items()}
        rate = gb / medians["verify_theirs"]
        print(
            json.dumps(
                {
                    "files": args.files,
                    "gb": round(gb, 3),
                    "rounds": args.rounds,
                    "median_s": {k: round(v, 4) for k, v in medians.items()},
                    "sign_ratio_theirs_over_ours": round(
                        medians["sign_theirs"] / medians["sign_ours"], 1
                    ),
                    "verify_ratio_theirs_over_ours": round(
                        medians["verify_theirs"] / medians["verify_ours"], 1
                    ),
                    "model_signing_hash_gb_per_s": round(rate, 2),
                    "model_signing_70b_bf16_s_each_way": round(SEVENTY_B_BF16_GB / rate, 1),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
