"""Workflows: generate images, then upscale every output. The workflow is a ledger record of its own
(kind ``workflow``) whose steps are ordinary jobs linked to it by ``parent_id``; it ends when they do."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from genq.actions import Action, Notify, SubmitLater
from genq.intake import accept, start_workflow
from genq.ledger import Ledger
from genq.schemas import JobKind, JobRecord, JobState, UpscaleRequest, WorkflowRequest

log = logging.getLogger(__name__)


@dataclass
class WorkflowService:
    ledger: Ledger

    def step_ended(self, step: JobRecord) -> list[Action]:
        """Called once a step reaches a terminal state: start the next steps, or end the workflow."""
        if step.parent_id is None:
            return []
        parent = self.ledger.get(step.parent_id)
        if parent is None or parent.terminal or parent.kind is not JobKind.WORKFLOW:
            return []
        actions: list[Action] = []
        if step.kind is JobKind.IMAGE and step.state is JobState.SUCCEEDED:
            actions = self._start_upscales(parent, step)
            parent = self.ledger.get(parent.id) or parent
        return actions + self._maybe_finish(parent)

    def resume(self, parent: JobRecord) -> list[Action]:
        """Re-drive a workflow whose next move may have been lost: its creation stopped half-way (Redis
        failed after the workflow was written), or a step ended and the worker died before the hook ran.
        Starts what is missing, or ends it. Idempotent."""
        if parent.state is JobState.PENDING:
            request = WorkflowRequest.model_validate(parent.request)
            started = start_workflow(self.ledger, parent.id, request)
            return [SubmitLater(job_id, 0.0, batch=parent.batch) for job_id in started]
        if parent.state is not JobState.RUNNING or not parent.children:
            return []
        generated = self.ledger.get(parent.children[0])
        if generated is None:
            return self._fail_lost_step(parent, parent.children[0])
        return self.step_ended(generated) if generated.terminal else []

    def _start_upscales(self, parent: JobRecord, generated: JobRecord) -> list[Action]:
        request = WorkflowRequest.model_validate(parent.request)
        steps: list[str] = [generated.id]
        actions: list[Action] = []
        for index, image_id in enumerate(generated.remote_ids):
            upscale = UpscaleRequest(
                image_id=image_id,
                factor=request.upscale_factor,
                producer=parent.producer,
                lane=parent.lane,
                on_budget=parent.on_budget,
            )
            # Keyed per output, so a duplicate finalize of the generate step starts nothing twice.
            made = accept(
                self.ledger, upscale, idempotency_key=f"{parent.id}:upscale:{index}", parent_id=parent.id
            )
            steps.append(made.id)
            actions += [
                SubmitLater(job_id, 0.0, batch=parent.batch) for job_id in made.to_submit if made.created
            ]
        self.ledger.set_fields(parent.id, children=steps)
        return actions

    def _maybe_finish(self, parent: JobRecord) -> list[Action]:
        """End the workflow when its steps say so; its callback (if any) goes out then, once."""
        steps = [self.ledger.get(job_id) for job_id in parent.children]
        for job_id, step in zip(parent.children, steps, strict=True):
            if step is None:
                return self._fail_lost_step(parent, job_id)
        for step in steps:
            if step is not None and step.terminal and step.state is not JobState.SUCCEEDED:
                reason = f"step {step.kind.value} {step.id} ended {step.state.value}: {step.error}"
                moved = self.ledger.transition(parent.id, [JobState.RUNNING], JobState.FAILED, error=reason)
                return self._notify(parent) if moved.ok else []
        generated = steps[0] if steps else None
        if generated is None or generated.state is not JobState.SUCCEEDED:
            return []
        if len(steps) < 1 + len(generated.remote_ids) or not all(
            s and s.state is JobState.SUCCEEDED for s in steps
        ):
            return []
        outputs = [out for s in steps[1:] if s for out in s.outputs]
        fields = {
            f"out:{i:04d}": out.model_copy(update={"index": i}).model_dump_json()
            for i, out in enumerate(outputs)
        }
        self.ledger.set_fields(parent.id, **fields)
        if not self.ledger.transition(parent.id, [JobState.RUNNING], JobState.SUCCEEDED, error=None).ok:
            return []
        log.info("workflow %s succeeded with %d upscaled files", parent.id, len(outputs))
        return self._notify(parent)

    def _fail_lost_step(self, parent: JobRecord, step_id: str) -> list[Action]:
        """A step's record is gone (it ended, and its TTL ran out before the workflow heard of it: the
        hook was lost and no sweep ran for a whole job TTL). Its outcome and files are unknown, so the
        workflow cannot finish; it ends failed, saying why, rather than running for ever."""
        reason = f"step {step_id} expired before the workflow saw it end; its outcome is unknown"
        moved = self.ledger.transition(parent.id, [JobState.RUNNING], JobState.FAILED, error=reason)
        if not moved.ok:
            return []
        log.error("workflow %s failed: %s", parent.id, reason)
        return self._notify(parent)

    def _notify(self, parent: JobRecord) -> list[Action]:
        return [Notify(parent.id)] if parent.callback else []
