"""Put a small gsm8k-shaped dataset where `datasets` keeps what it downloaded from the hub.

The test machine is offline, so this stands in for a team loading openai/gsm8k once on a
machine with hub access: the cache has the same layout, and lm-eval's own gsm8k task (its
YAML, few-shot prompt and answer filters, unchanged) then loads it offline.

    python tests/helpers/plant_gsm8k.py CACHE_DIR     # in the quantize environment
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import datasets


def main(cache: Path) -> None:
    rows = [
        {
            "question": f"Tom has {i} apples and buys {i + 2} more. How many does he have?",
            "answer": f"He has {i} + {i + 2} = {2 * i + 2} apples.\n#### {2 * i + 2}",
        }
        for i in range(40)
    ]
    splits = {"train": rows[:20], "test": rows[20:]}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for split, part in splits.items():
            files[split] = f"{tmp}/{split}.parquet"
            datasets.Dataset.from_list(part).to_parquet(files[split])
        datasets.load_dataset("parquet", data_files=files, cache_dir=f"{tmp}/build")
        built = next(p.parent for p in Path(tmp, "build").rglob("dataset_info.json"))
        target = cache / "openai___gsm8k" / "main" / "0.0.0" / built.name
        target.mkdir(parents=True, exist_ok=True)
        for split in splits:
            shutil.copy(built / f"parquet-{split}.arrow", target / f"gsm8k-{split}.arrow")
        info = json.loads((built / "dataset_info.json").read_text())
        info.update(builder_name="gsm8k", config_name="main", dataset_name="gsm8k")
        (target / "dataset_info.json").write_text(json.dumps(info))
    print(target)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
