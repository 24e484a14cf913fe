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
from .money import SpendAlert, period_end
from .planning import Plan
from .policy import Policy
from .ports import Clock, JobStore, Ledger, NoObserver, Observer, Preferences, UnitOfWork
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
    retry_at: float | None = None  # a budget refusal: when the limit lifts


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
        observer: Observer | None = None,
    ):
        self.policy, self.router, self.uow, self.ledger = policy, router, uow, ledger
        self.jobs, self.preferences, self.clock = jobs, preferences, clock
        self.observer: Observer = observer or NoObserver()

    def counted(self, plan: Plan) -> bool:
        """Free local images are counted, not charged: when the settings say so and every model
        that may serve the job (the route and its fallbacks) costs no money."""
        return self.policy.free_images_per_period > 0 and all(
            r.spec.provider in self.policy.unpaid_providers
            for r, _ in self.router.candidates(plan.route, plan.request)
        )

    def estimate_micros(self, plan: Plan) -> int:
        """Enough for whichever model ends up serving: the route or one of its fallbacks."""
        if self.counted(plan):
            return 0
        return max(
            usd_to_micros(r.generator.estimate_cost(g))
            for r, g in self.router.candidates(plan.route, plan.request)
        )

    async def reserve(
        self,
        job: JobRecord,
        plan: Plan,
        estimate: int,
        group: str | None = None,
        roles: tuple[str, ...] = (),
    ) -> None:
        """Hold the estimate or raise a BudgetRefusal. A cancelled caller still lets a started
        reservation land, so that the refund after it cannot miss it."""
        reserving = asyncio.ensure_future(asyncio.to_thread(self._reserve, job, plan, estimate, group, roles))
        try:
            await asyncio.shield(reserving)
        except asyncio.CancelledError:
            await asyncio.gather(reserving, return_exceptions=True)
            raise

    def _guild_cap(self, guild: str | None) -> int | None:
        if guild is None:
            return None
        return self.preferences.guild(guild).spend_cap_micros or self.policy.guild_cap_micros or None

    def _reserve(
        self, job: JobRecord, plan: Plan, estimate: int, group: str | None, roles: tuple[str, ...]
    ) -> None:
        provider = plan.route.spec.provider
        now, period, policy = self.clock.time(), self.policy.budget_period, self.policy
        caps = Caps(
            paid=provider not in policy.unpaid_providers,
            daily_cap_micros=policy.daily_spend_cap_micros,
            day_start=period_start("day", now),
            guild_id=job.guild_id,
            guild_cap_micros=self._guild_cap(job.guild_id),
            period_start=period_start(period, now),
            max_requests=policy.max_requests_per_user,
            group=group,
            roles=roles,
            user_images_per_hour=policy.user_images_per_hour,
            guild_images_per_hour=policy.guild_images_per_hour,
            counted=self.counted(plan),
            images_per_period=policy.free_images_per_period,
            period_end=period_end(period, now),
            day_end=period_end("day", now),
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
        alerts: list[SpendAlert] = []
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
                if values["cost_micros"]:
                    alerts = self.ledger.claim_alerts(
                        self.policy.daily_spend_cap_micros, job.guild_id, self._guild_cap(job.guild_id)
                    )
            else:
                self.ledger.release(job.id)
            end.timings["record"] = round((time.perf_counter() - started) * 1000, 3)
            self.jobs.update(job.id, **values)
        for alert in alerts:  # after the commit: an alert is never told of a charge undone
            self.observer.spend_alert(alert)
        return JobOutcome(
            status=end.status,
            job=self.jobs.get(job.id),
            error=end.error,
            error_code=end.code,
            image_path=str(end.stored.path) if end.stored and end.stored.path else None,
            balance_usd=micros_to_usd(self.ledger.balance(job.user_id).available_micros),
            retry_at=end.retry_at,
        )
