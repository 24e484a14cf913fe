"""easel's GPU pool as a Ray Serve application (the `cluster` extra): one deployment per model,
each replica running the local generator (or another class with its constructor, `models()`,
`generate(request, progress)` and `close()`), and a small `pool` deployment, the application's
ingress, that keeps what each replica last reported (its jobs and batches) for `easel cluster
status`.

A replica's `generate` is streamed (`handle.options(stream=True)`): a `started` event naming the
replica, `progress` events with the fraction done and a preview, then one `image` or `error`
event. Concurrent requests meet in `@serve.batch`; within a batch, those with the same
`generators.batching.batch_key` go to the generator together and the rest one by one, so each
image is what the request gives alone. Cancelling the call cancels the generation.

Imported only where Ray is installed: by the cluster generator and `easel cluster`.
"""
from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ray import serve

from bot.core.models import GenerationRequest, GeneratorError
from generators.batching import batch_key

POOL = "pool"  # the ingress deployment: the replicas' reports
LOCAL_GENERATOR = "generators.local:DiffusersGenerator"


@dataclass(frozen=True)
class PoolOptions:
    """How each model's deployment runs."""

    num_gpus: float = 1.0
    num_cpus: float = 1.0
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 8
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.05

    def deployment_options(self, name: str) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options` of model `name`."""
        options: dict[str, Any] = {
            "name": name,
            "ray_actor_options": {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "graceful_shutdown_timeout_s": 5.0,
        }
        if self.min_replicas == self.max_replicas:
            options["num_replicas"] = self.max_replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "metrics_interval_s": 2.0,
                "upscale_delay_s": 5.0,
                "downscale_delay_s": 120.0,
            }
        return options


def _load(target: str) -> type:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class _Item:
    """One request waiting in a batch, with where its progress goes and its generation task."""

    request: GenerationRequest
    progress: Callable[[float, bytes | None], None]
    cancelled: bool = False
    task: asyncio.Future | None = None


@dataclass
class _Load:
    """What a replica reports to the pool."""

    model: str
    replica: str  # the replica's actor name in the "serve" namespace
    running: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    batches: dict[int, int] = field(default_factory=dict)  # batch size -> batches of that size
    at: float = 0.0
    seq: int = 0  # this replica's reports in order: they may arrive out of it


@serve.deployment
class ModelReplica:
    """One replica of one model's deployment."""

    async def __init__(self, model: str, generator_kwargs: dict[str, Any], generator: str = LOCAL_GENERATOR,
                       max_batch_size: int = 4, batch_wait_timeout_s: float = 0.05):
        self._generator = _load(generator)(**generator_kwargs)
        context = serve.get_replica_context()
        self._app = context.app_name
        self._load = _Load(model=model, replica=context.replica_id.to_full_id_str())
        self._pool: Any = None
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        await _warm_up(self._generator, model, generator_kwargs.get("data_dir"))

    async def specs(self) -> list[Any]:
        return self._generator.models()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[dict[str, Any]]:
        """Stream the events of one generation (see the module's docstring)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def progress(fraction: float, preview: bytes | None) -> None:  # from the generator's thread
            loop.call_soon_threadsafe(events.put_nowait, {"event": "progress", "fraction": fraction,
                                                          "preview": preview})

        item = _Item(request, progress)
        self._count("running", 1)
        outcome = asyncio.ensure_future(self._batched(item))
        finished = False
        try:
            yield {"event": "started", "replica": self._load.replica}
            while not outcome.done():
                waiter = asyncio.ensure_future(events.get())
                await asyncio.wait({waiter, outcome}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield waiter.result()
                else:
                    waiter.cancel()
            while not events.empty():
                yield events.get_nowait()
            finished = True
            result = outcome.result()
            self._count("done" if result["event"] == "image" else "failed", 1)
            yield result
        finally:
            self._count("running", -1)
            if not finished:  # the caller went away: cancelled, or its stream was dropped
                item.cancelled = True
                if item.task is not None:
                    item.task.cancel()
                outcome.cancel()
                self._count("cancelled", 1)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[_Item]) -> list[dict[str, Any]]:
        """Run one batch: requests with the same batch key together, the others alone."""
        groups: dict[Any, list[_Item]] = {}
        for n, item in enumerate(items):
            key = batch_key(item.request)
            groups.setdefault(("alone", n) if key is None else key, []).append(item)
        outcomes: dict[int, dict[str, Any]] = {}
        for group in groups.values():
            live = [item for item in group if not item.cancelled]
            if live:
                self._load.batches[len(live)] = self._load.batches.get(len(live), 0) + 1
            for item in live:
                item.task = asyncio.ensure_future(self._generator.generate(item.request, item.progress))
            results = await asyncio.gather(*(item.task for item in live), return_exceptions=True)
            for item, result in zip(live, results, strict=True):
                outcomes[id(item)] = _outcome(result)
        cancelled = {"event": "error", "error": "CancelledError", "message": "cancelled"}
        return [outcomes.get(id(item), cancelled) for item in items]

    def _count(self, what: str, change: int) -> None:
        setattr(self._load, what, getattr(self._load, what) + change)
        self._load.at = time.time()
        self._load.seq += 1
        if self._pool is None:
            self._pool = serve.get_deployment_handle(POOL, self._app)
        self._pool.report.remote(asdict(self._load))  # not awaited: the pool's view may lag

    async def __del__(self) -> None:
        await self._generator.close()


async def _warm_up(generator: Any, model: str, data_dir: Any) -> None:
    """Make one smallest, one-step image before taking requests: the model loads now, so the first
    job is not slow and a model that cannot load fails the deployment. Replicas on one host take
    turns (a lock file in the data folder), since the first may build the model's files there."""
    import fcntl
    from pathlib import Path

    from bot.core.models import GenerationParams, Kind

    spec = next(s for s in generator.models() if s.name == model)
    side = max(spec.min_side, spec.size_step)
    request = GenerationRequest(Kind.IMAGINE, GenerationParams(
        prompt="warm-up", seed=0, size=(side, side), steps=1, model=model))
    def take_turn() -> Any:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        lock = open(Path(data_dir) / ".easel-pool-warm-up.lock", "w")  # noqa: SIM115
        fcntl.flock(lock, fcntl.LOCK_EX)
        return lock

    lock = None if data_dir is None else await asyncio.to_thread(take_turn)
    try:
        await generator.generate(request)
    finally:
        if lock is not None:
            lock.close()


def _outcome(result: Any) -> dict[str, Any]:
    """A generation's result, or its failure, as the stream's last event."""
    if isinstance(result, asyncio.CancelledError):
        return {"event": "error", "error": "CancelledError", "message": "cancelled"}
    if isinstance(result, GeneratorError):
        return {"event": "error", "error": type(result).__name__, "message": str(result),
                "retry_after": getattr(result, "retry_after", None)}
    if isinstance(result, BaseException):
        return {"event": "error", "error": "GeneratorError",
                "message": f"{type(result).__name__}: {result}"}
    return {"event": "image", "image": result}


@serve.deployment(name=POOL, num_replicas=1, ray_actor_options={"num_cpus": 0})
class Pool:
    """The application's ingress: it holds the model deployments and their replicas' reports."""

    def __init__(self, models: dict[str, Any]):
        self._models = models
        self._reports: dict[str, dict[str, Any]] = {}

    async def report(self, load: dict[str, Any]) -> None:
        """Keep a replica's newest report: calls not awaited may be delivered out of order, and
        an older one must not bring back a job that has ended."""
        kept = self._reports.get(load["replica"])
        if kept is None or load["seq"] > kept["seq"]:
            self._reports[load["replica"]] = load

    async def snapshot(self) -> dict[str, Any]:
        return {"models": sorted(self._models), "replicas": list(self._reports.values())}


def build_app(generator_kwargs: dict[str, Any], options: PoolOptions,
              generator: str = LOCAL_GENERATOR) -> Any:
    """The application: one deployment per model of `generator_kwargs["models"]`, each replica
    built with those keyword arguments narrowed to its own model."""
    deployments = {}
    for name, source in generator_kwargs["models"].items():
        kwargs = {**generator_kwargs, "models": {name: source}}
        deployments[name] = ModelReplica.options(**options.deployment_options(name)).bind(
            name, kwargs, generator, options.max_batch_size, options.batch_wait_timeout_s)
    return Pool.bind(deployments)


def deploy(app: str, generator_kwargs: dict[str, Any], options: PoolOptions,
           generator: str = LOCAL_GENERATOR) -> None:
    """Deploy (or update) the application `app` on the Ray cluster this process is connected
    to; returns once every deployment is running (blocking)."""
    serve.start(proxy_location="Disabled")
    serve.run(build_app(generator_kwargs, options, generator), name=app, route_prefix=None)


def status(app: str) -> dict[str, Any]:
    """The application's state, its deployments' replica counts and each live replica's load
    (blocking; from the cluster this process is connected to)."""
    import ray

    overview = serve.status().applications.get(app)
    if overview is None:
        return {"app": app, "status": "NOT_DEPLOYED", "deployments": {}, "replicas": []}
    snapshot = serve.get_deployment_handle(POOL, app).snapshot.remote().result(timeout_s=10)
    live = []
    for load in snapshot["replicas"]:
        try:
            ray.get_actor(load["replica"], namespace="serve")
        except ValueError:  # gone: killed, or scaled down
            continue
        live.append(load)
    deployments = {name: {"status": _word(d.status), "replicas": {_word(k): v for k, v in d.replica_states.items()}}
                   for name, d in overview.deployments.items() if name != POOL}
    return {"app": app, "status": _word(overview.status), "deployments": deployments,
            "replicas": sorted(live, key=lambda r: (r["model"], r["replica"]))}


def _word(state: Any) -> str:
    return str(getattr(state, "value", state))
