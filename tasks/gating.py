"""What the accuracy gate (tasks/gate.py) and the performance gate (tasks/perf.py) share: both
builds' figures, each from a cached task of its own, then the report kept in the store (failing
ones too) and shown in the Prefect UI.

    baseline's figures -> candidate's figures -> judge (the gate's pure function) -> store
    -> markdown and table artifacts -> the verdict, with what refusing the candidate announces

A gate refuses nothing itself: the choice among the candidates (tasks/choose.py) does, when no
candidate passes both gates, so one failing recipe of a search stops nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from prefect.artifacts import create_table_artifact
from prefect.transactions import CommitMode, transaction
from pydantic import BaseModel

from llmship.contracts import Build, Side
from llmship.errors import LlmshipError
from llmship.manifest import Manifest
from llmship.settings import get_settings
from tasks.common import artifact_key, record_markdown, store_report

Figures = TypeVar("Figures")
Report = TypeVar("Report", bound=BaseModel)

# Candidates tried at once (tasks/choose.py, try_recipes) take turns at the baseline: the
# first evaluates (measures) it, the others find its figures cached instead of making them
# again beside it.
BASELINE_TURN = threading.Lock()


class Refusal(BaseModel):
    """What a failing gate announces: the event the alert automation hears, and the error
    the flow run fails with (its message is followed by where the report is stored)."""

    event: str
    payload: dict[str, Any]
    error: type[LlmshipError]
    message: str


class Judged(BaseModel, Generic[Report]):
    """A gate's report, and what is kept and shown of it: made by the gate's pure functions."""

    stage: str  # stored under stages/<stage>/<key>/; the artifacts' keys start with it
    key: str
    model: str
    report: Report
    markdown: str
    manifest: Manifest
    title: str  # the markdown artifact's description
    table_title: str
    table: list[dict[str, Any]]
    refusal: Refusal | None  # None: the candidate passed


class Verdict(BaseModel, Generic[Report]):
    """A gate's outcome for one candidate: its report, where it is stored, and what refusing
    the candidate announces (None: it passed)."""

    report: Report
    stored: str  # stages/<stage>/<key>
    refusal: Refusal | None


# on_earlier(prefix, report, the report stored there before): the same inputs judged before.
OnEarlier = Callable[[str, Report, Report], None]


def keep_report(judged: Judged[Report], on_earlier: OnEarlier) -> str:
    """The report in the store (stages/<stage>/<key>/); on_earlier when the same inputs were
    judged before (a failed gate run again after its alert)."""
    prefix, earlier = store_report(
        judged.stage, judged.key, judged.report, judged.markdown, judged.manifest
    )
    if earlier is not None:
        on_earlier(prefix, judged.report, earlier)
    return prefix


def judge_both(
    candidate: Build,
    baseline: Build,
    figures_of: Callable[[Build, Side], Figures],
    judge: Callable[[Figures, Figures], Judged[Report]],
    on_earlier: OnEarlier,
) -> Verdict[Report]:
    """Both builds' figures (figures_of: the gate's cached task), judge(baseline's,
    candidate's), the report kept and recorded."""
    # Each build's figures commit as they end, not with the gate's task: inside the gate's
    # transaction they would be rolled back with a gate that fails for another reason, and
    # the rerun would evaluate or measure both builds again (two model loads, minutes for 70B).
    with transaction(commit_mode=CommitMode.EAGER):
        with BASELINE_TURN:
            base = figures_of(baseline, Side.BASELINE)
        cand = figures_of(candidate, Side.CANDIDATE)
    judged = judge(base, cand)
    stored = keep_report(judged, on_earlier)
    record_markdown(
        judged.model, judged.stage, judged.markdown + f"\n\nStored: `{stored}`", judged.title
    )
    create_table_artifact(
        key=artifact_key(judged.model, f"{judged.stage}-table"),
        description=judged.table_title,
        table=judged.table,
    )
    refusal = judged.refusal
    if refusal is not None:
        refusal = refusal.model_copy(
            update={
                "payload": {"report": stored, **refusal.payload},
                "message": f"{refusal.message} (report: "
                f"s3://{get_settings().s3.artifacts_bucket}/{stored}/)",
            }
        )
    return Verdict(report=judged.report, stored=stored, refusal=refusal)
