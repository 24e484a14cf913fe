"""The Ray Serve GPU pool: the `cluster` generator against a real Ray instance started inside the
test process (`address = "local"`), two replicas of the tiny model, one instance for the session."""
from __future__ import annotations

import asyncio
import io
import socket
import time

import pytest

pytest.importorskip("ray", reason="the cluster tests need the 'cluster' extra (ray[serve])")
pytest.importorskip("diffusers", reason="the cluster tests need the 'local' extra (the tiny model)")

from PIL import Image  # noqa: E402

from bot.config import settings_from_dict  # noqa: E402
from bot.core.models import (  # noqa: E402
    GeneratedImage,
    GenerationParams,
    GenerationRequest,
    GeneratorUnavailable,
    Kind,
    ModelSpec,
)
from bot.core.routing import Route, Router  # noqa: E402
from generators.cluster import ClusterGenerator  # noqa: E402

MODEL = "pool-tiny"


def _settings(tmp, **cluster):
    return settings_from_dict({
        "storage": {"database": str(tmp / "easel.db"), "images_dir": str(tmp / "images")},
        "generators": {
            "local": {"models": {"tiny": "tiny"}, "steps": 2, "device": "cpu"},
            "cluster": {"address": "local", "models": {MODEL: "tiny"}, "min_replicas": 2, "max_replicas": 2,
                        "num_cpus": 0.5, "local_cpus": 2, "batch_wait_timeout_s": 0.3,
                        # A replica holds one batch: eight jobs at once need both replicas.
                        "max_ongoing_requests": 4, **cluster},
        },
    })


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """The settings of a pool that the first job started: Ray inside this process, the app deployed."""
    import ray
    from ray import serve

    tmp = tmp_path_factory.mktemp("cluster")
    settings = _settings(tmp)
    gen = ClusterGenerator(**settings.generators.cluster.generator_kwargs(settings))
    asyncio.run(gen.generate(_request(seed=1)))  # starts Ray and deploys: ~30 s
    yield settings
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def gen(pool):
    return ClusterGenerator(**pool.generators.cluster.generator_kwargs(pool))


def _request(seed=7, steps=2, size=(64, 64), prompt="a lighthouse", model=MODEL):
    return GenerationRequest(Kind.IMAGINE, GenerationParams(prompt=prompt, seed=seed, size=size, steps=steps,
                                                            model=model))


def _pixels(image: GeneratedImage) -> bytes:
    with Image.open(io.BytesIO(image.data)) as img:
        return img.convert("RGB").tobytes()


def _replicas(app="easel"):
    from generators.serve_app import status

    return {r["replica"]: r for r in status(app)["replicas"]}


async def _wait_for(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        found = await asyncio.to_thread(check)
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


async def test_same_seed_gives_the_same_pixels_on_a_replica_as_locally(pool, gen):
    from generators.local import DiffusersGenerator

    on_pool = await gen.generate(_request(seed=7))
    local = DiffusersGenerator(**pool.generators.cluster.deployment(pool)["generator_kwargs"])
    try:
        here = await local.generate(_request(seed=7, model="tiny"))
    finally:
        await local.close()
    other = await gen.generate(_request(seed=8))
    assert (on_pool.model, on_pool.provider, on_pool.seed) == (MODEL, "cluster", 7)
    assert _pixels(on_pool) == _pixels(here)
    assert _pixels(other) != _pixels(on_pool)


async def test_eight_concurrent_jobs_spread_over_both_replicas(gen):
    # A replica appears in the pool's loads once it has reported; one that has served nothing
    # yet may not have. Reports are not awaited, so the counts to start from are taken once the
    # earlier tests' reports have all arrived: nothing running, and the same twice in a row.
    # Both replicas must be up, too (the second may still be starting on a busy machine).
    from generators.serve_app import status

    def settled():
        if status("easel")["deployments"]["tiny"]["replicas"].get("RUNNING") != 2:
            return None
        first = _replicas()
        time.sleep(0.3)
        again = _replicas()
        return first if first == again and not any(r["running"] for r in again.values()) else None

    before = await _wait_for(settled, timeout=60.0)
    assert before is not None, "the two replicas did not come up and settle"
    results = await asyncio.gather(*(gen.generate(_request(seed=s)) for s in range(8)))
    assert [r.seed for r in results] == list(range(8))

    seen = []

    def spread():
        now = _replicas()
        done = {name: r["done"] - before.get(name, {"done": 0})["done"] for name, r in now.items()}
        seen.append((before, now))
        return done if sum(done.values()) == 8 and len(done) == 2 else None

    done = await _wait_for(spread)
    assert done and all(n >= 1 for n in done.values()), seen[-1]


async def test_progress_and_previews_stream_back(gen):
    seen = []
    await gen.generate(_request(steps=4), lambda fraction, preview: seen.append((fraction, preview)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) == 4
    previews = [p for _, p in seen if p]
    assert previews
    with Image.open(io.BytesIO(previews[0])) as img:
        assert img.format == "PNG"


async def test_compatible_requests_are_batched_and_each_image_is_what_it_gives_alone(gen):
    alone = [await gen.generate(_request(seed=s)) for s in (21, 22)]
    before = await asyncio.to_thread(_replicas)
    requests = [_request(seed=s) for s in (21, 22, 23, 24, 25, 26)] + [_request(seed=27, size=(72, 72))]
    together = await asyncio.gather(*(gen.generate(r) for r in requests))
    assert [_pixels(r) for r in together[:2]] == [_pixels(r) for r in alone]
    assert (together[-1].width, together[-1].height) == (72, 72)

    def batches():
        now = _replicas()
        sizes: dict[int, int] = {}
        for name, r in now.items():
            for size, n in r["batches"].items():
                sizes[size] = sizes.get(size, 0) + n - before.get(name, {"batches": {}})["batches"].get(size, 0)
        return sizes if sum(size * n for size, n in sizes.items()) == 7 else None

    sizes = await _wait_for(batches)
    assert sizes and max(size for size, n in sizes.items() if n) >= 2, sizes


async def test_cancelling_a_job_cancels_its_request(gen):
    started = asyncio.Event()
    job = asyncio.ensure_future(gen.generate(_request(steps=200), lambda f, p: started.set()))
    await asyncio.wait_for(started.wait(), 30)
    before = await asyncio.to_thread(_replicas)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job

    def total(loads, what):
        return sum(r[what] for r in loads.values())

    def stopped():
        now = _replicas()
        return now if total(now, "cancelled") > total(before, "cancelled") \
            and all(r["running"] == 0 for r in now.values()) else None

    # The replica stops at its next step (counted as cancelled), not after all 200 (counted as
    # done). Its report is not awaited, so on a busy machine it may take a while to arrive.
    now = await _wait_for(stopped, timeout=20.0)
    assert now and total(now, "done") == total(before, "done")


async def test_an_unreachable_cluster_is_a_provider_failure_and_the_fallback_serves(pool, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    settings = _settings(tmp_path, address=f"127.0.0.1:{port}")
    away = ClusterGenerator(**settings.generators.cluster.generator_kwargs(settings))
    with pytest.raises(GeneratorUnavailable, match="cannot reach the Ray cluster"):
        await away.generate(_request())

    class Fallback:
        provider = "fallback"

        def models(self):
            return [ModelSpec(name="backup", provider="fallback", kinds=frozenset({"imagine"}))]

        def unavailable_reason(self):
            return None

        def estimate_cost(self, request):
            return 0.0

        async def generate(self, request, progress=None):
            return GeneratedImage(b"png", 64, 64, request.model, "fallback", request.seed)

    router = Router([away, Fallback()], fallbacks={MODEL: "backup"}, breaker_failures=1)
    route = Route(away, away.models()[0])
    result = await router.generate(route, _request())
    assert (result.model, result.provider) == ("backup", "fallback")
    assert router.breakers["cluster"].state == "open"


async def test_an_app_that_is_not_deployed_is_unavailable(pool, tmp_path):
    settings = _settings(tmp_path, app="not-deployed")
    kwargs = settings.generators.cluster.generator_kwargs(settings)
    kwargs.pop("deploy")
    with pytest.raises(GeneratorUnavailable, match="easel cluster deploy"):
        await ClusterGenerator(**kwargs).generate(_request())


def test_cluster_status_shows_the_replicas_and_their_load(pool, capsys):
    import argparse

    from bot import cli_cluster

    assert cli_cluster.run(pool, argparse.Namespace(cluster_action="status", json=False)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "application easel: RUNNING"
    assert out[1].startswith("  model tiny: healthy (2 running)")
    assert sum("SERVE_REPLICA::easel#tiny#" in line for line in out) == 2


def test_the_models_are_the_local_generators_rules_on_the_pool(gen):
    (spec,) = gen.models()
    assert (spec.name, spec.provider, spec.family) == (MODEL, "cluster", "sd1")
    assert "sampler" in spec.options and gen.estimate_cost(_request()) > 0


async def test_a_replica_killed_mid_job_is_retried_once_on_the_other(gen):
    import ray

    progressed = asyncio.Event()
    job = asyncio.ensure_future(gen.generate(_request(seed=5, steps=60), lambda f, p: progressed.set()))
    await asyncio.wait_for(progressed.wait(), 30)
    def one_running():  # a report from an earlier test may still be on its way
        names = [n for n, r in _replicas().items() if r["running"]]
        return names if len(names) == 1 else None

    running = await _wait_for(one_running)
    assert running, "no single replica was seen running the job"
    ray.kill(ray.get_actor(running[0], namespace="serve"), no_restart=True)
    result = await asyncio.wait_for(job, 60)
    assert (result.model, result.seed) == (MODEL, 5)
    now = await asyncio.to_thread(_replicas)
    assert running[0] not in now


async def test_a_job_through_the_whole_app_runs_on_the_pool_and_is_charged_once(pool, tmp_path):
    from moderation import NoImageScreen
    from tests.helpers import job_request, start_app

    data = pool.model_dump()
    data["storage"] = {"database": str(tmp_path / "easel.db"), "images_dir": str(tmp_path / "images")}
    data["generation"] = {"default_model": MODEL}
    app = start_app(settings_from_dict(data), image_screen=NoImageScreen())
    try:
        out = await app.service.submit(job_request("imagine", "u1", "a lighthouse --seed 7", size=(64, 64), steps=2))
        assert out.ok, out.error
        assert (out.job.model, out.job.provider, out.job.seed) == (MODEL, "cluster", 7)
        charges = app.db.query("SELECT COUNT(*), SUM(-amount_micros) FROM ledger_entries WHERE kind = 'settle'"
                               " AND job_id = ?", (out.job.id,))[0]
        assert charges[0] == 1 and charges[1] == out.job.cost_micros
        assert app.ledger.balance("u1").reserved_micros == 0
    finally:
        await app.close()


async def test_the_pool_keeps_each_replicas_newest_report_whatever_order_they_arrive_in():
    from generators.serve_app import Pool

    pool = Pool.func_or_class({})
    newer = {"replica": "r1", "model": "tiny", "running": 0, "done": 6, "seq": 12}
    older = {**newer, "running": 1, "done": 5, "seq": 11}
    other = {**older, "replica": "r2", "seq": 1}
    for load in (newer, older, other):
        await pool.report(load)
    assert (await pool.snapshot())["replicas"] == [newer, other]
