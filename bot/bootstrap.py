"""The composition root: the one place where settings become storage, generators, screens and
the service. Tests and benchmarks pass `Overrides` for the seams they replace."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bot.core.accounts import Accounts
from bot.core.admission import Admission
from bot.core.billing import Billing
from bot.core.budgets import Budgets
from bot.core.enhancing import Enhancer
from bot.core.models import usd_to_micros
from bot.core.money import Money, Terms
from bot.core.negatives import BUILTIN as BUILTIN_NEGATIVES
from bot.core.planning import Planner
from bot.core.policy import Policy
from bot.core.ports import Clock, Generator, ImageScreen, PromptEnhancer, PromptScreen, Provenance
from bot.core.recovery import recover, this_process
from bot.core.results import Results
from bot.core.routing import RetryPolicy, Router
from bot.core.screening import Screening
from bot.core.service import EaselService
from generators.images import PillowCodec
from storage.blobs import LocalBlobStore
from storage.budget_rules import BudgetRules
from storage.db import Database
from storage.errors import StorageError
from storage.jobs import JobStore
from storage.ledger import Ledger
from storage.moderation_log import ModerationLog
from storage.preferences import Preferences
from storage.s3 import S3BlobStore

from .config import GENERATORS, ConfigError, Settings, queue_limits
from .metrics import Metrics

log = logging.getLogger("easel")


class SystemClock:
    def time(self) -> float:
        return time.time()


@dataclass(frozen=True)
class Reload:
    """What a reload built from new settings, ready to apply (App.prepare_reload)."""

    settings: Settings
    changed: list[str]  # "section.key"
    router: Router | None  # None: the generators and routing are unchanged
    prompts: PromptScreen


@dataclass(frozen=True)
class Overrides:
    """Seams for tests and benchmarks; None keeps what the settings say."""

    generators: list[Generator] | None = None
    image_screen: ImageScreen | None = None
    prompt_screen: PromptScreen | None = None
    queue_limits: Mapping[str, int] = field(default_factory=dict)  # provider -> slots
    clock: Clock = field(default_factory=SystemClock)


@dataclass
class App:
    settings: Settings
    db: Database
    ledger: Ledger
    jobs: JobStore
    blobs: LocalBlobStore | S3BlobStore
    preferences: Preferences
    router: Router
    screening: Screening
    service: EaselService
    accounts: Accounts
    budgets: Budgets
    results: Results
    clock: Clock
    metrics: Metrics
    moderation: ModerationLog
    retired: list[Router] = field(default_factory=list)  # replaced by a reload, to be closed
    provenance: Provenance | None = None  # what stored images carry (None: nothing added)
    queue_overrides: Mapping[str, int] = field(default_factory=dict)  # from Overrides (tests)

    def recover(self) -> list[int]:
        """Fail and refund what a dead easel process left in flight (a start-up step)."""
        return recover(
            self.jobs,
            self.ledger,
            self.db,
            self.clock,
            owner=self.service.owner,
            job_timeout_s=self.service.policy.job_timeout_s,
        )

    def prepare_reload(self, new: Settings) -> Reload:
        """Build what `new` needs (blocking: generators are made and asked for their models,
        which may ask servers; the prompt screen may load a model), so that a reload can build
        in a thread and `apply` on the loop. Raises ConfigError, changing nothing."""
        changed = _changed(self.settings.model_dump(), new.model_dump())
        router = None
        if any(key.startswith(("generators.", "routing.")) for key in changed):
            router = build_router(new, build_generators(new), on_failure=self.metrics.provider_failed)
        return Reload(new, changed, router, build_prompt_screen(new))

    def reload(self, new: Settings) -> list[str]:
        """`prepare_reload` and `apply` in one (blocking)."""
        return self.apply(self.prepare_reload(new))

    def apply(self, prepared: Reload) -> list[str]:
        """Apply what can change without a restart (budgets, limits, moderation rules, prompts);
        returns what changed, as "section.key" (with "(needs a restart)" for the rest)."""
        new = prepared.settings
        live = (
            "budget.",
            "generators.",
            "routing.",
            "queue.max_jobs_per_user",
            "moderation.prompt_rules",
            "prompts.",
            "generation.max_prompt_chars",
            "generation.default_model",
            "generation.default_strength",
            "generation.job_timeout_s",
            "generation.max_upload",
            "moderation.blocked_outputs_are_paid",
        )
        policy = policy_from(new)
        service = self.service
        service.policy = service.planner.policy = service.billing.policy = self.accounts.policy = policy
        self.budgets.policy = self.metrics.policy = policy
        service.admission.max_requests_per_user = policy.max_requests_per_user
        self.ledger.terms = terms_from(new)
        self.screening.prompts = prepared.prompts
        if prepared.router is not None:
            self._swap_router(prepared.router)
            service.admission.set_limits({**queue_limits(new), **self.queue_overrides})
        self.settings = new
        return [key if key.startswith(live) else f"{key} (needs a restart)" for key in prepared.changed]

    def _swap_router(self, router: Router) -> None:
        """The model list and routing, replaced; jobs in flight finish on the old generators,
        which `close_retired` closes once nothing runs."""
        service = self.service
        self.retired.append(self.router)
        self.router = service.router = service.planner.router = service.billing.router = router
        self.accounts.router = router

    async def close_retired(self, wait_s: float) -> None:
        """Close the generators a reload replaced, once no job is in flight (or after `wait_s`)."""
        running = self.service.in_flight()
        if running and wait_s > 0:
            await asyncio.wait(running, timeout=wait_s)
        while self.retired:
            await self.retired.pop().close()

    async def close(self) -> None:
        await self.close_retired(0)
        await self.router.close()
        enhancer = self.service.enhancer.enhancer
        if enhancer is not None and hasattr(enhancer, "close"):
            await enhancer.close()
        close_blobs = getattr(self.blobs, "close", None)  # an S3 store's client and thread
        if close_blobs is not None:
            await asyncio.to_thread(close_blobs)
        self.db.close()


def build_generators(settings: Settings) -> list[Generator]:
    """Every generator the settings enable, from the registry; none is imported otherwise."""
    built: list[Generator] = []
    for entry in GENERATORS:
        kwargs = entry.section(settings).generator_kwargs(settings)
        if kwargs is None:
            continue
        try:
            built.append(entry.load()(**kwargs))
        except ValueError as exc:  # an unknown model or price name in the settings
            raise ConfigError(f"{settings.source or 'settings'}: 'generators.{entry.name}': {exc}") from None
    return built


def build_prompt_screen(settings: Settings) -> PromptScreen:
    from moderation import DEFAULT_PROMPT_RULES, PromptRule, PromptScreen

    mod = settings.moderation
    rules = mod.prompt_rules
    chosen = (
        DEFAULT_PROMPT_RULES
        if rules is None
        else [PromptRule(name, tuple(r.terms), r.allow_in_nsfw_channels) for name, r in rules.items()]
    )
    terms = PromptScreen(chosen, real_people=tuple(mod.real_people))
    if not mod.semantic:
        return terms
    from moderation.semantic import LayeredScreen, SemanticScreen

    try:
        semantic = SemanticScreen(thresholds=dict(mod.semantic_thresholds))
    except ValueError as exc:
        raise ConfigError(f"moderation.semantic_thresholds: {exc}") from None
    reason = semantic.unavailable_reason()
    if reason is not None:
        raise ConfigError(f"moderation.semantic: {reason}")
    return LayeredScreen(terms, semantic)


def build_image_screen(settings: Settings) -> ImageScreen:
    """The configured image screens in order (nudenet, a classifier model, the safety checker),
    and the age-restricted channels' policy per category around them."""
    from moderation import AllScreens, ChannelPolicy, NoImageScreen, NudeNetScreen
    from moderation.classifier import ClassifierScreen, SafetyCheckerScreen

    mod = settings.moderation
    screens: list[ImageScreen] = []
    if mod.image_classifier != "none":
        screens.append(NudeNetScreen(threshold=mod.nsfw_threshold, nsfw_channel_policy=mod.nsfw_channels))
    if mod.classifier_model:
        if not mod.classifier_labels:
            raise ConfigError('moderation.classifier_labels: name the labels to block, e.g. {"nsfw" = 0.8}')
        screens.append(
            ClassifierScreen(
                str(_model_path(settings, mod.classifier_model)), blocked=dict(mod.classifier_labels)
            )
        )
    if mod.safety_checker:
        screens.append(SafetyCheckerScreen(settings.path(mod.safety_checker)))
    if not screens:
        return NoImageScreen()
    screen = screens[0] if len(screens) == 1 else AllScreens(screens)
    if mod.nsfw_policy:
        default = "allow" if mod.nsfw_channels == "allow" else "block"
        try:
            return ChannelPolicy(screen, dict(mod.nsfw_policy), default=default)
        except ValueError as exc:
            raise ConfigError(f"moderation.nsfw_policy: {exc}") from None
    return screen


def image_screen_names(settings: Settings) -> list[str]:
    """Which image screens run, for `easel check`."""
    mod = settings.moderation
    names = ["nudenet"] if mod.image_classifier != "none" else []
    names += [f"classifier {mod.classifier_model}"] if mod.classifier_model else []
    names += [f"safety checker {mod.safety_checker}"] if mod.safety_checker else []
    return names


def _model_path(settings: Settings, source: str) -> str:
    """A folder relative to the settings file, or a hub id as it is."""
    path = settings.path(source)
    return str(path) if path.exists() or source.startswith((".", "/", "~")) else source


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "prompt_rules":
            keys += _changed(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def build_router(
    settings: Settings, generators: list[Generator], on_failure: Callable[[str, str], None] | None = None
) -> Router:
    r = settings.routing
    return Router(
        generators,
        on_failure=on_failure,
        retry=RetryPolicy(
            attempts=r.retry_attempts,
            base_delay_s=r.retry_base_delay_s,
            max_retry_after_s=r.retry_max_wait_s,
        ),
        fallbacks=dict(r.fallbacks),
        breaker_failures=r.breaker_failures,
        breaker_cooldown_s=r.breaker_cooldown_s,
    )


def terms_from(settings: Settings) -> Terms:
    b = settings.budget
    return Terms(b.period, usd_to_micros(b.default_allowance_usd), usd_to_micros(b.carry_over_cap_usd))


def policy_from(settings: Settings) -> Policy:
    gen, budget = settings.generation, settings.budget
    return Policy(
        default_model=gen.default_model,
        max_prompt_chars=gen.max_prompt_chars,
        default_strength=gen.default_strength,
        upscale_factor=gen.upscale_factor,
        job_timeout_s=gen.job_timeout_s,
        max_upload_bytes=gen.max_upload_bytes,
        max_upload_pixels=gen.max_upload_pixels,
        max_requests_per_user=settings.queue.max_jobs_per_user,
        blocked_outputs_are_paid=settings.moderation.blocked_outputs_are_paid,
        daily_spend_cap_micros=usd_to_micros(budget.daily_spend_cap_usd),
        budget_period=budget.period,
        user_images_per_hour=budget.user_images_per_hour,
        guild_images_per_hour=budget.guild_images_per_hour,
        guild_cap_micros=usd_to_micros(budget.guild_cap_usd),
        free_images_per_period=budget.free_local_images,
        money=Money(usd_to_micros(budget.credit_usd)),
        tip_under_words=settings.prompts.tip_under_words,
        log_prompts=settings.moderation.log_prompts,
        cooldown_after=settings.moderation.cooldown_after,
        cooldown_window_s=settings.moderation.cooldown_window_s,
        cooldown_s=settings.moderation.cooldown_s,
        negative_prompts={
            **(BUILTIN_NEGATIVES if settings.prompts.builtin_negatives else {}),
            **settings.prompts.negative_prompts,
        },
    )


def build_enhancer(settings: Settings, policy: Policy) -> Enhancer:
    """The enhancement step, with the chat model that expands prompts when [enhance] names one."""
    e = settings.enhance
    chat: PromptEnhancer | None = None
    if e.model:
        from generators.enhance import ChatEnhancer

        chat = ChatEnhancer(
            model=e.model,
            api_key=e.api_key(),
            base_url=e.base_url or None,
            timeout_s=e.timeout_s,
            max_tokens=e.max_tokens,
            price_per_1k_tokens_usd=e.price_per_1k_tokens_usd,
        )
    return Enhancer(chat, on_failure=e.on_failure, max_prompt_chars=policy.max_prompt_chars)


def build_provenance(settings: Settings) -> Provenance:
    """The stamp every stored image gets; a bad certificate or key is one line at start-up."""
    from storage.provenance import Provenance

    try:
        provenance = Provenance(**settings.provenance.provenance_kwargs(settings))
    except StorageError as exc:
        raise ConfigError(f"{exc} (from {settings.source or 'built-in defaults'})") from None
    return provenance


def review_store(settings: Settings) -> LocalBlobStore | None:
    """Where blocked outputs are kept for review, if the settings keep them; outside the images
    folder, so the image server never serves them."""
    mod = settings.moderation
    if not mod.keep_blocked_outputs:
        return None
    root = settings.path(mod.review_dir)
    images = settings.path(settings.storage.images_dir)
    if root.resolve() == images.resolve() or images.resolve() in root.resolve().parents:
        raise ConfigError("moderation.review_dir must not be inside storage.images_dir (it would be served)")
    store = LocalBlobStore(root, "review://")
    try:
        store.check_writable()
    except StorageError as exc:
        raise ConfigError(f"moderation.review_dir: {exc}") from None
    return store


def open_storage(
    settings: Settings, *, backend: str | None = None
) -> tuple[Database, LocalBlobStore | S3BlobStore]:
    """The database and the blob store (`storage.backend`, or `backend`: "local" or "s3"),
    checked now: a problem with either is one line that names the setting and the settings file
    (a ConfigError), not a traceback mid-job. An S3 store owns a thread: `close()` it."""
    where = settings.source or "built-in defaults"
    st = settings.storage
    blobs: LocalBlobStore | S3BlobStore
    if (backend or st.backend) == "s3":
        if not st.s3.bucket.strip():
            raise ConfigError(f"storage.s3.bucket (from {where}): name the bucket to store images in")
        setting = "storage.s3"
        try:
            blobs = S3BlobStore(
                st.s3.bucket.strip(),
                prefix=st.s3.prefix,
                region=st.s3.region,
                endpoint_url=st.s3.endpoint_url,
                public_base_url=st.s3.public_base_url,
                presign_ttl_s=st.s3.presign_ttl_s,
            )
        except StorageError as exc:
            raise ConfigError(f"{setting} (from {where}): {exc}") from None
    else:
        setting = "storage.images_dir"
        blobs = LocalBlobStore(settings.path(st.images_dir), st.public_url)
    try:
        blobs.check_writable()
    except StorageError as exc:
        if isinstance(blobs, S3BlobStore):
            blobs.close()
        raise ConfigError(f"{setting} (from {where}): {exc}") from None
    try:
        return Database(settings.path(st.database)), blobs
    except StorageError as exc:
        if isinstance(blobs, S3BlobStore):
            blobs.close()
        raise ConfigError(f"storage.database (from {where}): {exc}") from None


def bootstrap(settings: Settings, overrides: Overrides = Overrides()) -> App:
    """Everything a front end needs, wired. Recovery is not run here: call `App.recover()`."""
    policy = policy_from(settings)
    clock = overrides.clock
    db, blobs = open_storage(settings)
    ledger = Ledger(db, terms_from(settings), clock.time)
    jobs = JobStore(db)
    preferences = Preferences(db)
    generators = build_generators(settings) if overrides.generators is None else overrides.generators
    metrics = Metrics(policy)
    moderation = ModerationLog(db)
    router = build_router(settings, generators, on_failure=metrics.provider_failed)
    codec = PillowCodec()
    screening = Screening(
        overrides.prompt_screen or build_prompt_screen(settings),
        overrides.image_screen or build_image_screen(settings),
        codec,
        observer=metrics,
    )
    service = EaselService(
        policy=policy,
        planner=Planner(policy, router, jobs, blobs, codec, preferences),
        screening=screening,
        billing=Billing(policy, router, db, ledger, jobs, preferences, clock, metrics),
        admission=Admission(
            {**queue_limits(settings), **overrides.queue_limits}, policy.max_requests_per_user
        ),
        router=router,
        jobs=jobs,
        blobs=blobs,
        codec=codec,
        owner=this_process(),
        enhancer=build_enhancer(settings, policy),
        observer=metrics,
        moderation=moderation,
        clock=clock,
        review=review_store(settings),
        provenance=(provenance := build_provenance(settings)),
    )
    metrics.watch(service.admission.load, lambda: {p: b.state for p, b in service.router.breakers.items()})
    return App(
        settings,
        db,
        ledger,
        jobs,
        blobs,
        preferences,
        router,
        screening,
        service,
        Accounts(policy, preferences, router, clock),
        Budgets(policy, ledger, BudgetRules(db), jobs, preferences, clock),
        Results(jobs, blobs, screening, moderation),
        clock,
        metrics,
        moderation,
        queue_overrides=overrides.queue_limits,
        provenance=provenance,
    )
