"""Composition: builds the storage, generators, screens and the pipeline from settings."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from generators.base import Generator
from moderation import DEFAULT_PROMPT_RULES, NoImageScreen, NudeNetScreen, PromptRule, PromptScreen
from storage.blobs import LocalBlobStore
from storage.db import Database
from storage.jobs import JobStore
from storage.ledger import Ledger, usd_to_micros

from .config import ConfigError, Settings
from .pipeline import Pipeline
from .router import RetryPolicy, Router


@dataclass
class App:
    settings: Settings
    db: Database
    ledger: Ledger
    jobs: JobStore
    blobs: LocalBlobStore
    router: Router
    pipeline: Pipeline

    async def close(self) -> None:
        await self.router.close()
        self.db.close()


def build_generators(settings: Settings) -> list[Generator]:
    gens: list[Generator] = []
    local = settings.generators.local
    if local.enabled:
        from generators.local import DiffusersGenerator

        gens.append(
            DiffusersGenerator(
                dict(local.models),
                data_dir=settings.path(settings.storage.images_dir).parent,
                device=local.device,
                dtype=local.dtype,
                default_steps=local.steps,
                default_guidance=local.guidance,
                price_per_second_usd=local.price_per_second_usd,
                upscaler=local.upscaler or None,
            )
        )
    cloud = settings.generators
    for name, conf, module, cls in (
        ("openai", cloud.openai, "generators.openai_images", "OpenAIImages"),
        ("replicate", cloud.replicate, "generators.replicate_flux", "ReplicateFlux"),
        ("together", cloud.together, "generators.together_flux", "TogetherFlux"),
    ):
        key = conf.api_key()
        if not conf.enabled or key is None:
            continue  # a cloud generator is available as soon as its key is set
        generator_class = getattr(importlib.import_module(module), cls)
        try:
            gens.append(generator_class(
                key, base_url=conf.base_url or None, timeout_s=conf.timeout_s,
                prices=dict(conf.prices) or None, enabled_models=list(conf.models) or None,
            ))
        except ValueError as exc:  # an unknown model or price name in the settings
            where = settings.source or "settings"
            raise ConfigError(f"{where}: 'generators.{name}': {exc}") from None
    return gens


def build_prompt_screen(settings: Settings) -> PromptScreen:
    rules = settings.moderation.prompt_rules
    if rules is None:
        return PromptScreen(DEFAULT_PROMPT_RULES)
    return PromptScreen(
        [PromptRule(name, tuple(r.terms), r.allow_in_nsfw_channels) for name, r in rules.items()]
    )


def build_image_screen(settings: Settings):
    mod = settings.moderation
    if mod.image_classifier == "none":
        return NoImageScreen()
    return NudeNetScreen(threshold=mod.nsfw_threshold, nsfw_channel_policy=mod.nsfw_channels)


def build_router(settings: Settings, generators: list[Generator]) -> Router:
    r = settings.routing
    return Router(
        generators,
        retry=RetryPolicy(attempts=r.retry_attempts, base_delay_s=r.retry_base_delay_s),
        fallbacks=dict(r.fallbacks),
        breaker_failures=r.breaker_failures,
        breaker_cooldown_s=r.breaker_cooldown_s,
    )


def build_app(settings: Settings, generators: list[Generator] | None = None, *, image_screen=None) -> App:
    """Everything a front end needs. `generators` and `image_screen` replace the configured ones
    (tests and benchmarks pass their own)."""
    db = Database(settings.path(settings.storage.database))
    ledger = Ledger(db, usd_to_micros(settings.budget.default_allowance_usd))
    jobs = JobStore(db)
    blobs = LocalBlobStore(settings.path(settings.storage.images_dir), settings.storage.public_url)
    router = build_router(settings, build_generators(settings) if generators is None else generators)
    gen = settings.generation
    pipeline = Pipeline(
        db=db, ledger=ledger, jobs=jobs, blobs=blobs, router=router,
        prompt_screen=build_prompt_screen(settings),
        image_screen=image_screen if image_screen is not None else build_image_screen(settings),
        default_model=gen.default_model,
        queue_limits={name: getattr(settings.generators, name).max_concurrent
                      for name in ("local", "openai", "replicate", "together")},
        max_jobs_per_user=settings.queue.max_jobs_per_user,
        max_prompt_chars=gen.max_prompt_chars,
        default_strength=gen.default_strength,
        upscale_factor=gen.upscale_factor,
        job_timeout_s=gen.job_timeout_s,
        max_upload_bytes=gen.max_upload_bytes,
        max_upload_pixels=gen.max_upload_pixels,
        blocked_outputs_are_paid=settings.moderation.blocked_outputs_are_paid,
        daily_spend_cap_usd=settings.budget.daily_spend_cap_usd,
        budget_period=settings.budget.period,
    )
    pipeline.recover()
    return App(settings, db, ledger, jobs, blobs, router, pipeline)
