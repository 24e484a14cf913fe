"""Billing: estimate a job's cost, reserve it before anything is spent, and record the job's end
together with settling (charging) or releasing its money, in one transaction."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from .models import (
    Blocked,
    Caps,
    ErrorCode,
    GeneratedImage,
    JobOutcome,
    JobRecord,
    JobStatus,
    StoredBlob,
    micros_to_usd,
    period_start,
    usd_to_micros,
)
from .planning import Plan
from .policy import Policy
from .ports import Clock, JobStore, Ledger, Preferences, UnitOfWork
from .routing import Router


@dataclass
class Ending:
    """How a job ended, for `Billing.finish`."""

    status: JobStatus
    code: ErrorCode | None = None
    error: str | None = None
    charge: bool = False  # settle (what the generator billed, else the estimate) or release
    result: GeneratedImage | None = None
    stored: StoredBlob | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # Prompt enhancement: the prompt drawn (None: as planned), the prompt as typed, what the
    # enhancement cost (charged with the image, within the reservation), and a note.
    prompt: str | None = None
    original_prompt: str | None = None
    extra_micros: int = 0
    note: str | None = None
    blocked: Blocked | None = None  # what decided a moderation block (for the moderation log)
    spoiler: bool = False  # shown as a spoiler (an age-restricted channel's policy)


class Billing:
    def __init__(
        self,
        policy: Policy,
        router: Router,
        uow: UnitOfWork,
        ledger: Ledger,
        jobs: JobStore,
        preferences: Preferences,
        clock: Clock,
    ):
        self.policy, self.router, self.uow, self.ledger = policy, router, uow, ledger
        self.jobs, self.preferences, self.clock = jobs, preferences, clock

    def estimate_micros(self, plan: Plan) -> int:
        """Enough for whichever model ends up serving: the route or one of its fallbacks."""
        return max(
            usd_to_micros(r.generator.estimate_cost(g))
            for r, g in self.router.candidates(plan.route, plan.request)
        )

    async def reserve(self, job: JobRecord, plan: Plan, estimate: int, group: str | None = None) -> None:
        """Hold the estimate or raise a BudgetRefusal. A cancelled caller still lets a started
        reservation land, so that the refund after it cannot miss it."""
        reserving = asyncio.ensure_future(asyncio.to_thread(self._reserve, job, plan, estimate, group))
        try:
            await asyncio.shield(reserving)
        except asyncio.CancelledError:
            await asyncio.gather(reserving, return_exceptions=True)
            raise

    def _reserve(self, job: JobRecord, plan: Plan, estimate: int, group: str | None) -> None:
        provider = plan.route.spec.provider
        now = self.clock.time()
        guild = job.guild_id
        caps = Caps(
            paid=provider not in self.policy.unpaid_providers,
            daily_cap_micros=self.policy.daily_spend_cap_micros,
            day_start=period_start("day", now),
            guild_id=guild,
            guild_cap_micros=self.preferences.guild(guild).spend_cap_micros if guild else None,
            period_start=period_start(self.policy.budget_period, now),
            max_requests=self.policy.max_requests_per_user,
            group=group,
        )
        with self.uow.transaction():
            self.ledger.reserve(job.user_id, job.id, estimate, caps, provider)
            self.jobs.update(job.id, estimate_micros=estimate)

    async def finish(self, job: JobRecord, ending: Ending) -> JobOutcome:
        return await asyncio.to_thread(self._finish, job, ending)

    def _finish(self, job: JobRecord, end: Ending) -> JobOutcome:
        started = time.perf_counter()
        values: dict[str, Any] = dict(
            status=end.status,
            error=end.error,
            error_code=end.code,
            finished_at=self.clock.time(),
            timings=end.timings,
        )
        result = end.result
        params = job.params if end.prompt is None else job.params.but(prompt=end.prompt)
        if end.prompt is not None:
            values.update(params=params, original_prompt=end.original_prompt)
        if result is not None:
            values.update(
                params=params.but(model=result.model, seed=result.seed, size=(result.width, result.height)),
                provider=result.provider,
                revised_prompt=result.revised_prompt,
                note=result.note,
            )
        if end.note is not None:
            values["note"] = "; ".join(filter(None, [values.get("note"), end.note]))
        if end.stored is not None:
            values.update(sha256=end.stored.key, image_url=end.stored.url, spoiler=end.spoiler)
        with self.uow.transaction():
            if end.charge:
                billed = result.cost_usd if result is not None else None
                current = self.jobs.get(job.id)
                actual = (
                    (current.estimate_micros if current else 0)
                    if billed is None
                    else usd_to_micros(billed) + end.extra_micros
                )
                values["cost_micros"] = self.ledger.settle(
                    job.id, actual, provider=result.provider if result is not None else None
                )
            else:
                self.ledger.release(job.id)
            end.timings["record"] = round((time.perf_counter() - started) * 1000, 3)
            self.jobs.update(job.id, **values)
        return JobOutcome(
            status=end.status,
            job=self.jobs.get(job.id),
            error=end.error,
            error_code=end.code,
            image_path=str(end.stored.path) if end.stored and end.stored.path else None,
            balance_usd=micros_to_usd(self.ledger.balance(job.user_id).available_micros),
        )
