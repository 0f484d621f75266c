"""`llmship`, the command line: what people do outside the Prefect UI. It sits on the top floor,
beside the flows, since it reaches every layer below (the stack, the fleet, the versions).

    llmship up                 start the local stack (idempotent) and register deployments
    llmship down               stop everything `up` and the rollouts started
    llmship status             what runs where: model -> version -> replicas -> node
    llmship scale MODEL N      run N replicas of MODEL's live version (no new version)
    llmship versions MODEL     published versions, the recipe that won, gate verdicts, live
    llmship candidates MODEL [VERSION]
                               the recipe search that picked the version (default: live)
    llmship rollback MODEL [--to VERSION] [--reason TEXT] [--allow-ungated]
                               run the rollback/MODEL deployment and wait for it
    llmship plan FLOW/DEPLOYMENT [--gpus N --gpu-memory-gib G --compute-capability X.Y]
                               the stages with estimated GPU memory, disk and time, and every
                               preflight check; exit 2 if the deployment would be refused
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx

from llmship import stack
from llmship.credentials import prefect_client_settings
from llmship.errors import (
    BadAlias,
    LlmshipError,
    RollbackFailed,
    SignatureRefused,
    StackError,
    UnpublishedVersion,
)
from llmship.settings import get_settings
from llmship.store import ArtifactStore, key_part, version_prefix


def cmd_up(args) -> None:
    stack.up(get_settings())
    print("stack is up")


def cmd_down(args) -> None:
    stack.down(get_settings())
    print("stack is down")


def running_stack_settings():
    """The settings of the stack running in the state folder, as it was started."""
    return stack.as_started(get_settings())


def cmd_status(args) -> None:
    settings = running_stack_settings()
    rows = stack.status(settings)
    if not rows:
        print(f"nothing is running (state: {settings.state_dir})")
        return
    for name, pid, alive, port in rows:
        where = f"{settings.host}:{port}" if port else "-"
        print(f"{name:32s} pid {pid:<8d} {'running' if alive else 'DEAD':8s} {where}")
    try:
        models = httpx.get(f"{settings.gateway_url}/v1/models", timeout=3).json()["data"]
        # What the gateway refused at its start: a bad alias, a version that may not serve.
        problems = httpx.get(f"{settings.gateway_url}/ready", timeout=3).json()
        problems = problems.get("alias_problems", {})
    except (httpx.HTTPError, ValueError):
        models, problems = [], {}
    print()
    print(f"Prefect UI   http://{settings.host}:{settings.prefect_port}")
    print(
        f"S3           {settings.s3_url}  (bucket {settings.s3.artifacts_bucket}; keys in "
        f"{settings.credentials_file})"
    )
    for line in _waiting_runs(settings):
        print(line)
    print(f"gateway      {settings.gateway_url}")
    for m in models:
        canary = m.get("canary")
        print(
            f"  serving    {m['id']} version {m['version']}"
            + (f", canary {canary['version']} at {canary['percent']:g}%" if canary else "")
        )
    for what, problem in sorted(problems.items()):
        print(f"  REFUSED    {what}: {problem}")
    for server in _fleet(settings):
        role = (
            f"kept warm until {time.strftime('%H:%M:%S', time.localtime(server.warm_until))}"
            if server.warm_until
            else server.role
        )
        print(
            f"  {server.model} {server.version}: {server.status}, {len(server.endpoints)}/"
            f"{server.replicas} replica(s) up, {role}"
        )
        for e in server.endpoints:
            gpus = f", GPUs {','.join(e.gpus)}" if e.gpus else ""
            started = f"  cold start {took}" if (took := e.cold_start()) else ""
            print(
                f"    replica {e.replica}  node {e.node_ip}  engine {e.url}{gpus}{started}  "
                f"log {e.log}"
            )
    if models:
        name = models[0]["id"]
        print(
            "\ntry:\n  curl -s " + settings.gateway_url + "/v1/completions -H "
            "'content-type: application/json' -d '{\"model\": \"" + name + '", "prompt": '
            '"Clause: The Vendor shall pay the Buyer the sum of $312,500 no later than March 3, '
            "2027."
            '\\nQuestion: What amount does the clause state?\\nAnswer:", "max_tokens": 16, '
            '"temperature": 0}\''
        )


def _waiting_runs(settings) -> list[str]:
    """Flow runs Prefect has marked Late (due, and no worker took them), with their pool and
    what to start: a GPU run on a stack with no GPU worker waits there without a word."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )

    try:
        with prefect_client_settings(settings), get_client(sync_client=True) as client:
            late = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Late"]))
                ),
                limit=20,
            )
            pools = {p.name: p for p in client.read_work_pools()}
    except Exception as exc:  # noqa: BLE001 - status must answer even with Prefect down
        return [f"  (the Prefect API cannot be asked: {type(exc).__name__})"]
    lines = []
    for run in late:
        pool = pools.get(run.work_pool_name)
        state = pool.status.value if pool and pool.status else "unknown"
        lines.append(
            f"  waiting    flow run {run.name} since {run.expected_start_time:%H:%M:%S} UTC: "
            f"work pool {run.work_pool_name} is {state}"
            + (
                f"; start a worker: prefect worker start --pool {run.work_pool_name}"
                if state == "NOT_READY"
                else ""
            )
        )
    return lines


def _fleet(settings) -> list:
    """The fleet's servers, or none when the Ray cluster cannot be asked (it is down)."""
    from serving import fleet

    try:
        return fleet.running(settings)
    except Exception as exc:  # noqa: BLE001 - status must answer even with Ray down
        print(
            f"  (the Ray cluster at {settings.ray.address or 'the local stack'} cannot be "
            f"asked: {type(exc).__name__}: {exc})"
        )
        return []


def cmd_scale(args) -> None:
    from serving import fleet

    settings = running_stack_settings()
    live = ArtifactStore(settings).read_alias(args.model, "live")
    server = live and fleet.find(settings, args.model, live)
    if not server:
        raise StackError(
            f"{args.model} has no live version with servers to scale "
            f"(live: {live or 'none'}); roll one out first"
        )
    server = fleet.scale(settings, server, args.replicas)
    print(
        f"{args.model} {live}: {len(server.endpoints)} replica(s) on "
        f"{', '.join(sorted({e.node_ip for e in server.endpoints}))}"
    )


def cmd_versions(args) -> None:
    from llmship.versions import read_signed_version, scan_versions

    settings = running_stack_settings()
    store = ArtifactStore(settings)
    aliases, notes = {}, []
    for name in ("live", "previous"):
        try:
            aliases[name] = store.read_alias(args.model, name)
        except BadAlias as exc:  # the versions are worth listing all the same
            aliases[name] = None
            notes.append(f"{name} alias: {exc}")
    scan = scan_versions(store, args.model)
    if not scan.versions and not scan.unreadable:
        print(f"{args.model} has no published versions")
        return
    print(
        f"{'version':14s} {'created (UTC)':20s} {'recipe':26s} {'gate':6s} {'perf':6s} "
        f"{'tok/s x':>8s} {'MB':>8s}  {'signed':8s} alias"
    )
    for v in scan.versions:
        try:
            signed = read_signed_version(store, args.model, v.version).signed_by[:8]
        except SignatureRefused:  # `llmship verify` says why
            signed = "NO"
        alias = next((n for n, named in aliases.items() if named == v.version), "")
        perf = {None: "-", True: "pass", False: "FAIL"}[v.perf_passed]
        # The candidate's output tokens/s over the baseline's, at the production load.
        ratio = "-" if v.throughput_ratio is None else f"{v.throughput_ratio:.2f}"
        print(
            f"{v.version:14s} {v.created_at[:19]:20s} {(v.recipe or v.scheme)[:26]:26s} "
            f"{'pass' if v.gate_passed else 'FAIL':6s} {perf:6s} "
            f"{ratio:>8s} {v.bytes / 1e6:8.1f}  {signed:8s} {alias}"
        )
    # One bad manifest is named, not a reason to list nothing (nor to fail the command).
    for version, problem in sorted(scan.unreadable.items()):
        print(f"{version:14s} UNREADABLE: {problem}")
    for note in notes:
        print(note)


def cmd_candidates(args) -> None:
    """The comparison stored beside the version: every recipe's figures, verdict and why."""
    store = ArtifactStore(running_stack_settings())
    version = args.version or store.read_alias(args.model, "live")
    if version is None:
        raise UnpublishedVersion(
            f"{args.model} has no live version: name one (`llmship versions {args.model}`)"
        )
    prefix = version_prefix(key_part(args.model, "model"), key_part(version, "version"))
    found = store.get_bytes(f"{prefix}/candidates.md")
    if found is None:
        raise UnpublishedVersion(
            f"{args.model} {version} has no recipe search beside it (published before "
            "searches, or by hand): `llmship versions` lists the versions"
        )
    print(found[0].decode())


def cmd_verify(args) -> None:
    """Exit 0 only when every version checked holds: signed by a trusted key, every object
    as signed, its gates passed."""
    from llmship.versions import list_versions, verify_stored

    store = ArtifactStore(running_stack_settings())
    versions = (
        [args.version] if args.version else [v.version for v in list_versions(store, args.model)]
    )
    if not versions:
        raise UnpublishedVersion(f"{args.model} has no published versions to verify")
    failed = []
    for version in versions:
        print(f"{args.model} {version}")
        checks = verify_stored(store, args.model, version)
        for check in checks:
            print(f"  {check.what:17s} {'ok  ' if check.ok else 'FAIL'} {check.detail}")
        if not all(c.ok for c in checks):
            failed.append(version)
    if failed:
        raise SignatureRefused(f"{args.model}: {', '.join(failed)} did not verify (above)")
    print(f"verified: {', '.join(versions)}")


def cmd_rollback(args) -> None:
    """Through the rollback deployment, not around it: the run, its reason and its outcome are
    in the Prefect UI beside the rollbacks started there."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from llmship.forms import offer_published_versions
    from llmship.versions import read_version

    settings = running_stack_settings()
    name = f"rollback/{args.model}"
    if args.to and read_version(ArtifactStore(settings), args.model, args.to) is None:
        raise StackError(
            f"{args.model} has no published version {args.to!r}; "
            f"`llmship versions {args.model}` lists them"
        )
    # The deployment's form takes only the versions it lists: list every one published now.
    offer_published_versions(settings, args.model)
    parameters = {
        "model": args.model,
        "reason": args.reason,
        "target_version": args.to,
        "allow_ungated": args.allow_ungated,
    }
    with prefect_client_settings(settings):
        try:
            flow_run = run_deployment(
                name, parameters=parameters, timeout=args.timeout, poll_interval=1
            )
        except ObjectNotFound:
            raise StackError(
                f"there is no deployment {name}: add one to prefect.yaml "
                "(see rollback/tiny-llama) and run `llmship up`"
            ) from None
        state = flow_run.state
        if state.is_completed():
            result = state.result()
            was = f" (was {result.previous})" if result.previous else ""
            print(f"{args.model}: {result.version} is live{was}; flow run {flow_run.name}")
            return
    if not state.is_final():
        raise RollbackFailed(
            f"flow run {flow_run.name} of {name} is still {state.name} after "
            f"{args.timeout:.0f} s; follow it in the Prefect UI"
        )
    raise RollbackFailed(f"flow run {flow_run.name} of {name} ended {state.name}: {state.message}")


def deployment_config(name: str):
    """The PipelineConfig a deployment in prefect.yaml runs with, by FLOW/DEPLOYMENT name."""
    import importlib

    import yaml

    from llmship.pipeline_config import PipelineConfig
    from llmship.settings import REPO_ROOT

    flow_name, _, deployment = name.partition("/")
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    known = []
    for d in spec.get("deployments", []):
        module, _, fn = d["entrypoint"].partition(":")
        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), fn)
        known.append(f"{flow.name}/{d['name']}")
        if known[-1] == name:
            if "config" not in d.get("parameters", {}):
                raise StackError(
                    f"{name} takes no pipeline config: plan is for build-and-serve "
                    "and recalibrate deployments"
                )
            return PipelineConfig.model_validate(d["parameters"]["config"])
    raise StackError(
        f"there is no deployment {name!r} in prefect.yaml; there are: {', '.join(known)}"
    )


def cmd_plan(args) -> None:
    from tasks.preflight import Gpu, plan, render

    settings = running_stack_settings()
    config = deployment_config(args.deployment)
    gpus = None
    if args.gpus is not None:
        major, _, minor = args.compute_capability.partition(".")
        gpus = [
            Gpu(
                index=i,
                name="planned GPU",
                memory_gib=args.gpu_memory_gib,
                compute_capability=(int(major), int(minor or 0)),
            )
            for i in range(args.gpus)
        ]
        settings = settings.model_copy(update={"device": "cuda" if args.gpus else "cpu"})
    result = plan(
        config,
        settings,
        gpus=gpus,
        free_disk_gib=args.free_disk_gib,
        check_services=not args.offline,
    )
    print(f"plan for {args.deployment}")
    print(render(result, config))
    if result.refusals:
        raise StackError(
            f"{args.deployment} would be refused here: {len(result.refusals)} "
            f"check(s) failed ({', '.join(c.name for c in result.refusals)})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmship", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the local stack").set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop the local stack").set_defaults(fn=cmd_down)
    sub.add_parser("status", help="what runs where").set_defaults(fn=cmd_status)
    scale = sub.add_parser("scale", help="change the replica count of a model's live version")
    scale.add_argument("model")
    scale.add_argument("replicas", type=int)
    scale.set_defaults(fn=cmd_scale)
    versions = sub.add_parser("versions", help="published versions of a model")
    versions.add_argument("model")
    versions.set_defaults(fn=cmd_versions)
    candidates = sub.add_parser(
        "candidates", help="the recipe search that picked a version: the table and the chart"
    )
    candidates.add_argument("model")
    candidates.add_argument("version", nargs="?", default=None, help="default: the live one")
    candidates.set_defaults(fn=cmd_candidates)
    verify = sub.add_parser(
        "verify", help="check a version's signature, every stored file and its gates' verdicts"
    )
    verify.add_argument("model")
    verify.add_argument("version", nargs="?", default=None, help="default: every version")
    verify.set_defaults(fn=cmd_verify)
    rollback = sub.add_parser("rollback", help="move a model's traffic to an earlier version")
    rollback.add_argument("model")
    rollback.add_argument(
        "--to",
        metavar="VERSION",
        default=None,
        help="a published version (default: the previous one)",
    )
    rollback.add_argument("--reason", default="rolled back with `llmship rollback`")
    rollback.add_argument(
        "--allow-ungated",
        action="store_true",
        help="serve a version without a passing gate record (an override)",
    )
    rollback.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    rollback.set_defaults(fn=cmd_rollback)
    plan = sub.add_parser("plan", help="estimate and check a deployment before running it")
    plan.add_argument("deployment", help="FLOW/DEPLOYMENT, e.g. build-and-serve/llama3-70b")
    plan.add_argument(
        "--gpus", type=int, default=None, help="plan for this many GPUs rather than this machine's"
    )
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0)
    plan.add_argument("--compute-capability", default="9.0")
    plan.add_argument(
        "--free-disk-gib",
        type=float,
        default=None,
        help="plan for this much free disk rather than this machine's",
    )
    plan.add_argument(
        "--offline", action="store_true", help="skip the S3, hub and environment checks"
    )
    plan.set_defaults(fn=cmd_plan)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except LlmshipError as exc:
        print(f"llmship: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
