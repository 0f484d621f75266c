"""The evaluate job: lm-evaluation-harness scores one build on the gate's tasks (quantize
environment).

The tasks are the domain tasks of calibration_data/<dataset>/eval.jsonl (each item kind becomes
a local lm-eval task: greedy generation, exact match on the answer) and, optionally, standard
lm-eval tasks (mmlu, gsm8k, ...) whose data is in the local datasets cache. By default the
build is evaluated through the engine that serves it (lm-eval's `local-completions` client
against the server the fleet runs for it); the `hf` backend loads it in transformers instead.

    python -m jobs.evaluate --request R.json --result S.json   # in the quantize environment

tasks/gate.py is its orchestration; the gate's rule is in tasks/gate_rule.py.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from llmship.domain_data import load_eval_items
from llmship.errors import GateConfigError, ServerExited
from llmship.pipeline_config import EvalBackend
from llmship.subprocess_stage import stage_main
from serving.engines import answers_health


class TaskSet(BaseModel):
    """What the gate evaluates: lm-eval task names, domain ones built from eval.jsonl."""

    dataset: str
    eval_file: str
    eval_data_sha256: str
    domain: list[str]  # item kinds of eval.jsonl
    standard: list[str]  # lm-eval task names

    def domain_task(self, kind: str) -> str:
        return f"llmship_{self.dataset}_{kind}"

    @property
    def names(self) -> list[str]:
        return [self.domain_task(k) for k in self.domain] + self.standard

    def kind_of(self, name: str) -> str:
        prefix = f"llmship_{self.dataset}_"
        return name.removeprefix(prefix) if name.startswith(prefix) else name


class EvaluateRequest(BaseModel):
    model_dir: str
    tasks: TaskSet
    backend: EvalBackend
    served_name: str  # the model name the evaluation server answers to
    # backend served: the engine of the build's evaluation server (the fleet's), as it will
    # serve; evaluate_task asks the fleet for it.
    base_url: str | None = None
    limit: int | None = None
    device: str = "cpu"


class TaskScore(BaseModel):
    metrics: dict[str, float]  # every numeric metric lm-eval reported, e.g. "exact_match,strip"
    n: int


class Evaluation(BaseModel):
    backend: EvalBackend
    scores: dict[str, TaskScore]
    seconds: float
    kept_server: str | None = None  # the fleet's application left running for the rollout


def write_domain_tasks(tasks: TaskSet, out: Path) -> None:
    """One lm-eval task YAML per item kind, reading its own JSONL split of the items."""
    by_kind: dict[str, list[dict]] = {}
    for item in load_eval_items(Path(tasks.eval_file)):
        by_kind.setdefault(item.task, []).append(item.model_dump())
    for kind in tasks.domain:
        name = tasks.domain_task(kind)
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in by_kind[kind]))
        # JSON is valid YAML: no template engine between us and the harness' config parser.
        (out / f"{name}.yaml").write_text(
            json.dumps(
                {
                    "task": name,
                    "dataset_path": "json",
                    "dataset_kwargs": {"data_files": {"test": str(data)}},
                    "test_split": "test",
                    "output_type": "generate_until",
                    "doc_to_text": "{{prompt}}",
                    "doc_to_target": "{{answer}}",
                    "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 24},
                    "filter_list": [
                        {
                            "name": "strip",
                            "filter": [
                                {"function": "remove_whitespace"},
                                {"function": "take_first"},
                            ],
                        }
                    ],
                    "metric_list": [
                        {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
                    ],
                    "metadata": {"version": 1.0},
                },
                indent=2,
            )
        )


def load_task_manager(tasks: TaskSet, include_path: Path):
    """lm-eval's task index, with each standard task's data checked to be here, offline."""
    from lm_eval.tasks import TaskManager

    # Indexing the harness' own ~15k task configs takes ~15 s: only when they are asked for.
    manager = TaskManager(include_path=str(include_path), include_defaults=bool(tasks.standard))
    for name in tasks.standard:
        if name not in manager.all_tasks:
            raise GateConfigError(
                f"lm-eval {_harness_version()} has no task {name!r} "
                "(gate.standard_tasks): see `lm_eval --tasks list`"
            )
        try:
            manager.load_task_or_group([name])
        except (ConnectionError, OSError, FileNotFoundError) as exc:
            from datasets import config as datasets_config

            cache = datasets_config.HF_DATASETS_CACHE
            raise GateConfigError(
                f"the data of lm-eval task {name!r} is not in the local datasets cache "
                f"({cache}) and this machine is offline: {exc}. Load it once where the hub is "
                f"reachable (README, 'Standard tasks'), or drop {name!r} from "
                "gate.standard_tasks"
            ) from None
    return manager


def _harness_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def _model_args(req: EvaluateRequest, base_url: str | None) -> tuple[str, str]:
    if req.backend is EvalBackend.HF:
        # float32 on CPU (its bf16 matmuls are slow here); on GPUs the checkpoint's own dtype,
        # spread over every GPU (parallelize) as a 70B model needs.
        if req.device == "cpu":
            return "hf", f"pretrained={req.model_dir},dtype=float32,device=cpu"
        return "hf", f"pretrained={req.model_dir},dtype=auto,parallelize=True"
    # add_bos_token: without it the completions client sends prompts without BOS and scores
    # collapse (docs/FINDINGS.md, lm-evaluation-harness: 0.96 -> 0.24); vLLM itself adds it
    # when it tokenizes text.
    return "local-completions", (
        f"base_url={base_url}/v1/completions,model={req.served_name},"
        f"tokenizer={req.model_dir},tokenizer_backend=huggingface,"
        "add_bos_token=True,num_concurrent=8,max_retries=3"
    )


def evaluate(req: EvaluateRequest) -> Evaluation:
    """Score one build on the gate's tasks, through the backend the request names."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llmship-lm-eval-") as tmp:
        write_domain_tasks(req.tasks, Path(tmp))
        import lm_eval

        manager = load_task_manager(req.tasks, Path(tmp))
        model, model_args = _model_args(req, req.base_url)
        print(
            f"lm-eval ({model}): {', '.join(req.tasks.names)} on {req.model_dir}"
            + (f" through {req.base_url}" if req.base_url else ""),
            flush=True,
        )
        try:
            results = lm_eval.simple_evaluate(
                model=model,
                model_args=model_args,
                tasks=req.tasks.names,
                task_manager=manager,
                batch_size=32 if model == "hf" else 1,
                limit=req.limit,
                log_samples=False,
            )
        except Exception:
            if req.base_url and not answers_health(req.base_url):
                # Not a flaky evaluation: this build, as configured, crashes the engine
                # that would serve it. Retrying cannot help; its log says why.
                raise ServerExited(
                    f"the model server for {req.model_dir} at {req.base_url} stopped "
                    "answering during the evaluation: this build cannot be served with these "
                    "engine arguments on this machine (the engine's log is named in "
                    "`llmship status`)"
                ) from None
            raise
    scores = {}
    for name in req.tasks.names:
        row = results["results"][name]
        metrics = {
            k: float(v)
            for k, v in row.items()
            if isinstance(v, (int, float)) and "_stderr" not in k and "," in k
        }
        scores[name] = TaskScore(metrics=metrics, n=_items_of(results, name))
        print(f"  {name}: {metrics} (n={scores[name].n})", flush=True)
    return Evaluation(
        backend=req.backend, scores=scores, seconds=round(time.monotonic() - started, 3)
    )


def _items_of(results: dict, name: str) -> int:
    """Items a task (or a group, such as mmlu: the sum of its subtasks) was scored on."""
    samples = results.get("n-samples", {})
    if name in samples:
        return int(samples[name]["effective"])
    subtasks = results.get("group_subtasks", {}).get(name, [])
    return sum(_items_of(results, sub) for sub in subtasks)


if __name__ == "__main__":
    stage_main(evaluate, EvaluateRequest)
