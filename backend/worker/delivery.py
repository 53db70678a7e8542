"""Delivery: claim -> predict -> record or release -> return or post, for clicks, bulk batches and refreshes.

Every prediction the backend hands to Label Studio goes through a Delivery, which keeps the ledger's promise of
exactly one prediction per (task, model version): a task is predicted only under a claim; a claim ends either
recorded (the prediction was returned to the waiting web process or posted) or released (so a later job delivers
it). Each task ends with one typed TaskOutcome; job results are made from those, not from message strings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

from ..core.bulk import Progress
from ..core.context import ProjectContext
from ..core.ledger import VIA_POSTED, VIA_RETURNED, Claim, DeliveryLedger, MayTake
from .ls_client import LabelStudioRefused, LabelStudioUnavailable
from .runtime import WorkerContext, report_progress
from .segmenter import PredictionRun

logger = logging.getLogger(__name__)


class Delivered(str, Enum):
    """How one task's delivery ended."""

    RETURNED = "returned"
    """Handed to the waiting web process, which returns it to Label Studio (recorded)."""
    POSTED = "posted"
    """Stored in Label Studio through its API (recorded)."""
    SKIPPED = "skipped"
    """Not claimed: Label Studio already holds one of this version, or another job delivers it."""
    NOT_POSTED = "not_posted"
    """Label Studio could not be reached (or no API access): released, a retry or the next run delivers it."""
    FAILED = "failed"
    """The model could not predict the task, or Label Studio refused the prediction: released, reported."""


@dataclass(frozen=True)
class TaskOutcome:
    """One task's end: what happened and, when it was not delivered, why (the error's class and HTTP status)."""

    task_id: int
    delivered: Delivered
    message: str = ""
    kind: str = ""
    status: int | None = None
    """Label Studio's HTTP status when it refused the prediction; the status the backend answers with otherwise."""

    @property
    def retryable(self) -> bool:
        """True when the same prediction may be posted later (Label Studio was unreachable)."""
        return self.delivered is Delivered.NOT_POSTED

    def reason(self) -> str:
        """The one-line reason shown in job results and /status."""
        if self.delivered is Delivered.NOT_POSTED:
            return f"not posted yet: {self.message}"
        if self.kind == LabelStudioRefused.__name__:
            return f"Label Studio refused it: {self.message}"
        return self.message


class Delivery:
    """One job's deliveries of one project's tasks with one model version, through that version's ledger."""

    def __init__(self, ctx: WorkerContext, project: ProjectContext, job_id: str, progress: Progress | None = None):
        self.ctx, self.project, self.job_id, self.progress = ctx, project, job_id, progress
        self.ledger = DeliveryLedger(ctx.redis, project.project, project.model_version)
        self.outcomes: dict[int, TaskOutcome] = {}

    def claim(self, task_ids: list[int], may_take: MayTake) -> dict[int, Claim]:
        """Claim the tasks this job may deliver (the rest are another job's, or delivered already)."""
        return {c.task_id: c for c in self.ledger.claim(task_ids, self.job_id, self.project.revision, may_take)}

    def skip(self, task_id: int, why: str) -> None:
        """Record a task this job does not deliver."""
        self.outcomes[task_id] = TaskOutcome(task_id, Delivered.SKIPPED, why)

    def predict(self, claims: dict[int, Claim], tasks: list[dict]) -> PredictionRun:
        """Predict the claimed tasks; a task the model fails is released and FAILED (every claim is released when the
        model itself fails, and the error goes on)."""
        try:
            run = self.ctx.segmenter(self.project).predict(
                self.project.project, [t for t in tasks if int(t["id"]) in claims], self.project.config)
        except BaseException:
            for claim in claims.values():
                self.ledger.release(claim)
            raise
        for failure in run.failures:
            self.ledger.release(claims.pop(failure.task_id))
            self._end(TaskOutcome(failure.task_id, Delivered.FAILED, failure.message, kind="PredictionFailed"))
        return run

    def record_returned(self, claims: dict[int, Claim], revision: int) -> None:
        """The claimed predictions go back to the waiting web process: recorded as returned."""
        for tid, claim in claims.items():
            self.ledger.record(claim, via=VIA_RETURNED, revision=revision)
            self.outcomes[tid] = TaskOutcome(tid, Delivered.RETURNED)

    def post(self, claims: dict[int, Claim], predictions: dict[int, dict], revision: int, *,
             drop_other_versions: bool = False) -> list[TaskOutcome]:
        """Post each claimed prediction as its task's only one of the version (with `drop_other_versions`, its only
        one at all); the outcomes, in claim order. Once Label Studio is unavailable the remaining tasks are not
        tried: they are released NOT_POSTED, for the job's retry or the next run."""
        api = self.ctx.api_or_none(self.project)
        down: str | None = None if api is not None else (
            "no Label Studio API access to post predictions (LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY)")
        ended = []
        for tid, claim in claims.items():
            if down is None:
                try:
                    ls_id, dropped = api.replace_prediction(tid, predictions[tid], self.project.project,
                                                            drop_other_versions)
                except LabelStudioUnavailable as exc:
                    down = exc.message
                except LabelStudioRefused as exc:
                    self.ledger.release(claim)
                    ended.append(self._end(TaskOutcome(tid, Delivered.FAILED, exc.message, type(exc).__name__,
                                                       exc.status_code)))
                    continue
                else:
                    self.ledger.record(claim, via=VIA_POSTED, ls_id=ls_id, revision=revision)
                    for version in dropped:  # those deliveries are gone from Label Studio: they stop counting
                        DeliveryLedger(self.ctx.redis, self.project.project, version).deleted(tid)
                    ended.append(self._end(TaskOutcome(tid, Delivered.POSTED)))
                    continue
            self.ledger.release(claim)
            ended.append(self._end(TaskOutcome(tid, Delivered.NOT_POSTED, down, LabelStudioUnavailable.__name__,
                                                   LabelStudioUnavailable.status)))
        if down is not None:
            logger.warning("project %s: %d predictions not posted: %s", self.project.project,
                           sum(o.retryable for o in ended), down)
        return ended

    def _end(self, outcome: TaskOutcome) -> TaskOutcome:
        """Keep a task's outcome and show it in the bulk progress."""
        self.outcomes[outcome.task_id] = outcome
        if self.progress is not None:
            if outcome.delivered is Delivered.POSTED:
                self.progress.mark_done(outcome.task_id)
                report_progress(done=self.count(Delivered.POSTED))
            elif outcome.delivered in (Delivered.FAILED, Delivered.NOT_POSTED):
                self.progress.mark_failed(outcome.task_id, outcome.reason())
        return outcome

    def count(self, delivered: Delivered) -> int:
        """How many tasks ended so."""
        return sum(o.delivered is delivered for o in self.outcomes.values())

    def reasons(self, *kinds: Delivered) -> dict[int, str]:
        """Per task that ended as one of `kinds`, its reason."""
        return {tid: o.reason() for tid, o in self.outcomes.items() if o.delivered in kinds}
