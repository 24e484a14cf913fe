"""`easel cluster`: deploy easel's models to a Ray Serve GPU pool (deploy), and show its replicas
and their load (status). The cluster is the one `[generators.cluster] address` names, started with
Ray's own commands (`ray start --head`, then `ray start --address=...` on each GPU host).

Exit status: 0 done (status: the application is running), 1 the cluster cannot be reached or
the application is not running, 2 a usage or settings error."""
from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    """The `cluster` command and its actions, on `easel`'s subparsers."""
    p = sub.add_parser("cluster", help="deploy the models to a Ray Serve GPU pool, or show its replicas")
    actions = p.add_subparsers(dest="cluster_action", required=True, metavar="ACTION")
    actions.add_parser("deploy", help="deploy (or update) the Serve application: one deployment per "
                                      "model of [generators.local.models]")
    status = actions.add_parser("status", help="the application's deployments, replicas and their load")
    status.add_argument("--json", action="store_true", help="print one JSON object")


def run(settings, args) -> int:
    """Run `easel cluster <action>`; the exit status."""
    import importlib.util

    from bot.core.models import GeneratorUnavailable

    from .cli import EXIT_FAILED, EXIT_USAGE, _fail

    cluster = settings.generators.cluster
    if importlib.util.find_spec("ray") is None:
        return _fail("easel cluster needs the 'cluster' extra: pip install 'easel[cluster]'", EXIT_USAGE)
    if not cluster.address.strip():
        return _fail("generators.cluster.address is not set: \"auto\" (this machine's Ray cluster), "
                     "host:port of the head node, or \"local\"", EXIT_USAGE)
    from generators.cluster import connect

    try:
        connect(cluster.address, local_cpus=cluster.local_cpus or None)
    except GeneratorUnavailable as exc:
        return _fail(str(exc), EXIT_FAILED)
    return _deploy(settings) if args.cluster_action == "deploy" else _status(settings, args)


def _deploy(settings) -> int:
    from generators.serve_app import PoolOptions, deploy

    cluster = settings.generators.cluster
    plan = cluster.deployment(settings)
    models = plan["generator_kwargs"]["models"]
    print(f"deploying {', '.join(models)} as the Serve application {cluster.app!r} "
          f"({cluster.min_replicas}-{cluster.max_replicas} replicas each, {plan['options']['num_gpus']:g} GPU "
          f"per replica)...", file=sys.stderr)
    deploy(cluster.app, plan["generator_kwargs"], PoolOptions(**plan["options"]))
    print(f"deployed: {', '.join(models)} in {cluster.app!r}")
    return 0


def _status(settings, args) -> int:
    from generators.serve_app import status

    app = settings.generators.cluster.app
    found = status(app)
    if args.json:
        print(json.dumps(found))
    else:
        for line in status_lines(found):
            print(line)
    return 0 if found["status"] == "RUNNING" else 1


def status_lines(found: dict) -> list[str]:
    """`easel cluster status` as plain lines: the application, each deployment, each replica."""
    lines = [f"application {found['app']}: {found['status']}"]
    for name, deployment in found["deployments"].items():
        counts = ", ".join(f"{n} {state.lower()}" for state, n in deployment["replicas"].items()) or "no replicas"
        lines.append(f"  model {name}: {deployment['status'].lower()} ({counts})")
    for r in found["replicas"]:
        batches = ", ".join(f"{n}x{size}" for size, n in sorted(r["batches"].items())) or "none"
        lines.append(f"    {r['replica']}: {r['running']} running, {r['done']} done, {r['failed']} failed, "
                     f"{r['cancelled']} cancelled; batches {batches}")
    return lines
