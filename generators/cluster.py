"""The `cluster` generator: easel's models served by a Ray Serve GPU pool (the `cluster` extra;
the application is `generators.serve_app`, deployed with `easel cluster deploy`).

Each easel model name maps to a deployed model (`pool-sdxl = "sdxl"`); a job is one streamed call
of that model's deployment handle, which Serve routes to a replica: progress and previews come
back as they happen, cancelling the job cancels the call, and the image is what the local
generator makes with the same model, seed and inputs on the same kind of machine. What a model
can do and what a job may cost are the local generator's rules for the deployed model's source
(where the settings name it), so `models()` and estimates never wait for the cluster.

Failures the circuit breaker counts: an unreachable cluster or a missing application is
GeneratorUnavailable; a replica that dies mid-job is retried once (Serve routes the retry to a
live replica) and, dying again, GeneratorUnavailable, so the job is refunded and never charged
twice; a full queue is a TransientGeneratorError.

`address = "local"` starts a Ray instance inside this process (its CPUs) and deploys the
application there from the local generator's settings: what the tests use. One process is
connected to one Ray cluster.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import logging
import socket
import threading
from pathlib import Path
from typing import Any

from bot.core.models import (
    ContentPolicyError,
    GeneratedImage,
    GenerationRequest,
    GeneratorError,
    GeneratorUnavailable,
    ModelSpec,
    ProgressCallback,
    TransientGeneratorError,
    UnsupportedRequest,
)

log = logging.getLogger(__name__)

PROVIDER = "cluster"
LOCAL = "local"
NAMESPACE = "easel"
PROBE_TIMEOUT_S = 3.0
MISSING_EXTRA = "the cluster generator needs the 'cluster' extra: pip install 'easel[cluster]'"
_ERRORS = {cls.__name__: cls for cls in (GeneratorError, GeneratorUnavailable, UnsupportedRequest,
                                         ContentPolicyError)}

_connection_lock = threading.Lock()
_connected_to: str | None = None  # the address this process's Ray connection was made with


def connect(address: str, *, local_cpus: int | None = None) -> None:
    """Connect this process to the Ray cluster at `address` ("local": start one here), once;
    GeneratorUnavailable when it cannot be reached or another cluster is connected (blocking)."""
    global _connected_to
    import ray

    if address not in (LOCAL, "auto") and address != _connected_to:
        _probe(address)
    with _connection_lock:
        if _connected_to is not None or ray.is_initialized():
            if _connected_to not in (None, address):
                raise GeneratorUnavailable(
                    f"this process is connected to the Ray cluster at {_connected_to!r}, not "
                    f"{address!r}: one process reaches one cluster")
            _connected_to = address
            return
        try:
            if address == LOCAL:
                _start_local(local_cpus)
            else:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False,
                         configure_logging=False)
        except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
            raise GeneratorUnavailable(f"cannot reach the Ray cluster at {address!r}: {_first_line(exc)}") from None
        _connected_to = address


def _start_local(local_cpus: int | None) -> None:
    """Start a Ray instance in this process. Ray's processes die with the thread that started
    them (PR_SET_PDEATHSIG), and a caller's thread may be a pool's short-lived worker: so it is
    started from a thread that lives as long as the process."""
    import ray

    started: list[BaseException | None] = []
    done = threading.Event()

    def keeper() -> None:
        try:
            ray.init(num_cpus=local_cpus, include_dashboard=False, namespace=NAMESPACE,
                     log_to_driver=False, configure_logging=False)
            started.append(None)
        except BaseException as exc:  # handed to the caller
            started.append(exc)
        done.set()
        threading.Event().wait()  # keep Ray's processes alive until the process ends

    threading.Thread(target=keeper, name="easel-ray-local", daemon=True).start()
    done.wait()
    if started[0] is not None:
        raise started[0]


def _probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast where the head's port does not answer: ray.init would wait minutes for it."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except ValueError:
        raise GeneratorUnavailable(f"the Ray address {address!r} is not host:port, ray://host:port, "
                                   f'"auto" or "local"') from None
    except OSError as exc:
        why = "connection refused" if isinstance(exc, ConnectionRefusedError) else (exc.strerror or type(exc).__name__)
        raise GeneratorUnavailable(f"cannot reach the Ray cluster at {address!r}: {why}") from None


class ClusterGenerator:
    """Generator for the models deployed on a Ray Serve GPU pool."""

    provider = PROVIDER

    def __init__(
        self,
        *,
        address: str,
        app: str,
        models: dict[str, str],
        sources: dict[str, str] | None = None,
        data_dir: Path,
        price_per_second_usd: float = 0.001,
        timeout_s: float = 600.0,
        deploy: dict[str, Any] | None = None,
        local_cpus: int | None = None,
    ):
        if not address.strip():
            raise ValueError('the cluster generator needs an address: "local", "auto" or host:port')
        if not models:
            raise ValueError("the cluster generator needs [generators.cluster.models], e.g. pool-sdxl = \"sdxl\"")
        self._address, self._app, self._deployed = address, app, dict(models)
        self._sources = dict(sources or {})
        self._data_dir, self._price, self._timeout_s = Path(data_dir), price_per_second_usd, timeout_s
        self._deploy, self._local_cpus = deploy, local_cpus
        self._rules: Any = None  # the local generator, for its specs and estimates only
        self._handles: dict[str, Any] = {}
        self._ready = asyncio.Lock()

    # --- the Generator protocol ---

    def models(self) -> list[ModelSpec]:
        return [dataclasses.replace(spec, provider=PROVIDER,
                                    description=f"on the Ray GPU pool ({self._app}/{self._deployed[spec.name]})")
                for spec in self._local_rules().models()]

    def unavailable_reason(self) -> str | None:
        return None if importlib.util.find_spec("ray") else MISSING_EXTRA

    def estimate_cost(self, request: GenerationRequest) -> float:
        return self._local_rules().estimate_cost(request)

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        if request.model not in self._deployed:
            raise UnsupportedRequest(f"there is no cluster model {request.model!r} (cluster models: {', '.join(self._deployed)})")
        reason = self.unavailable_reason()
        if reason:
            raise GeneratorUnavailable(reason)
        handle = await self._handle(request.model)
        deployed = request.for_model(self._deployed[request.model])
        for attempt in (1, 2):
            try:
                async with asyncio.timeout(self._timeout_s):
                    image = await self._call(handle, deployed, progress)
                return dataclasses.replace(image, model=request.model, provider=PROVIDER)
            except TimeoutError:
                raise TransientGeneratorError(f"the Ray pool gave no image within {self._timeout_s:g} s") from None
            except _ReplicaDied as exc:
                if attempt == 2:
                    raise GeneratorUnavailable(f"the Ray pool's replicas of {deployed.model!r} died twice "
                                               f"during this job ({exc})") from None
                log.warning("a replica of %r died mid-job (%s); retrying once on another", deployed.model, exc)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._handles.clear()

    # --- the pool ---

    def _local_rules(self) -> Any:
        if self._rules is None:
            from generators.local import DiffusersGenerator

            sources = {name: self._sources.get(deployed, deployed) for name, deployed in self._deployed.items()}
            self._rules = DiffusersGenerator(sources, data_dir=self._data_dir, price_per_second_usd=self._price)
        return self._rules

    async def _handle(self, model: str) -> Any:
        async with self._ready:
            if not self._handles:
                await asyncio.to_thread(self._start)
            return self._handles[model]

    def _start(self) -> None:
        """Connect, deploy the application where this process runs the cluster itself, and
        make one handle per model (blocking)."""
        from ray import serve

        connect(self._address, local_cpus=self._local_cpus)
        running = serve.status().applications.get(self._app)
        if running is None and self._address == LOCAL and self._deploy is not None:
            from generators.serve_app import PoolOptions, deploy

            deploy(self._app, self._deploy["generator_kwargs"], PoolOptions(**self._deploy["options"]))
        elif running is None:
            raise GeneratorUnavailable(f"the Ray cluster at {self._address!r} has no Serve application "
                                       f"{self._app!r}: run `easel cluster deploy`")
        self._handles = {name: serve.get_deployment_handle(deployed, self._app).options(stream=True)
                         for name, deployed in self._deployed.items()}

    async def _call(self, handle: Any, request: GenerationRequest, progress: ProgressCallback | None) -> GeneratedImage:
        """One streamed call; its last event is the image or the replica's error."""
        stream = handle.generate.remote(request)
        finished = False
        try:
            async for event in stream:
                if event["event"] == "progress" and progress is not None:
                    progress(event["fraction"], event["preview"])
                elif event["event"] == "image":
                    finished = True
                    return event["image"]
                elif event["event"] == "error":
                    finished = True
                    raise _rebuild(event)
        except (GeneratorError, asyncio.CancelledError):
            raise
        except Exception as exc:
            finished = True
            raise _translate(exc) from None
        finally:
            if not finished:  # cancelled, or timed out: stop the replica's work
                stream.cancel()
        raise _ReplicaDied("its stream ended without an image")


class _ReplicaDied(Exception):
    pass


def _rebuild(event: dict[str, Any]) -> GeneratorError:
    """A replica's error event as the GeneratorError it was."""
    if event["error"] == "TransientGeneratorError":
        return TransientGeneratorError(event["message"], event.get("retry_after"))
    if event["error"] == "CancelledError":
        return TransientGeneratorError("the Ray pool cancelled the job (its replica is stopping)")
    return _ERRORS.get(event["error"], GeneratorError)(event["message"])


def _translate(exc: Exception) -> Exception:
    """A Ray or Serve failure as easel's kind of failure."""
    import ray.exceptions
    from ray.serve import exceptions as serve_exceptions

    if isinstance(exc, (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError,
                        ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.NodeDiedError)):
        return _ReplicaDied(type(exc).__name__)
    if isinstance(exc, serve_exceptions.BackPressureError):
        return TransientGeneratorError(f"the Ray pool is full: {_first_line(exc)}")
    if isinstance(exc, ray.exceptions.TaskCancelledError):
        return asyncio.CancelledError()
    if isinstance(exc, (serve_exceptions.DeploymentUnavailableError, ray.exceptions.RaySystemError,
                        ConnectionError)):
        return GeneratorUnavailable(f"the Ray pool cannot be reached: {_first_line(exc)}")
    return GeneratorError(f"the Ray pool failed: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."
