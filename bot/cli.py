"""The `easel` command line. Heavy modules (torch, the pipeline) are imported only by the
commands that need them, so `easel --help` answers at once."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from .core.flags import OPTION_FLAGS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BLOCKED, EXIT_OVER_BUDGET = 0, 1, 2, 3, 4
DEFAULT_USER = "local"


def _size(text: str):
    from .core.flags import FlagError, parse_size

    try:
        return parse_size(text)
    except FlagError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seed(text: str) -> int:
    from .core.flags import FlagError, parse_seed

    try:
        return parse_seed(text)
    except FlagError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _usd(text: str) -> float:
    try:
        value = float(text.lstrip("$"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount in USD like 2.50") from None
    if not -1e6 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range")
    return value


def _user(text: str) -> str:
    from .core.models import Refusal
    from .core.prompting import check_user_id

    try:
        check_user_id(text)
    except Refusal as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError("must be 1-1000")
    return value


def _printable(text: object) -> str:
    """What may reach a terminal: control characters (escape sequences) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="easel", description="Self-hosted AI image generation: command line and Discord bot."
    )
    parser.add_argument("--config", metavar="PATH", help="settings file (default: $EASEL_CONFIG, else ./easel.toml, else built-in defaults)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def job_options(p, *, seed=True):
        if seed:
            p.add_argument("--seed", type=_seed, help="seed (default: chosen at random and recorded)")
        p.add_argument("--model", help="model name or alias (see `easel models`)")
        p.add_argument("--steps", type=int, help="inference steps")
        p.add_argument("--guidance", type=float, help="guidance scale")
        p.add_argument("--user", type=_user, default=DEFAULT_USER, help=f"whose budget pays (default: {DEFAULT_USER})")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        for name in OPTION_FLAGS:  # model options (see `easel models`): quality, sampler, ...
            p.add_argument(f"--{name}", help=f"{name}, for models that take it (see `easel models`)")

    p = sub.add_parser("imagine", help="make an image from a prompt (inline --seed/--no/--ar flags work too)")
    p.add_argument("prompt")
    p.add_argument("--negative", help="what to keep out of the image")
    p.add_argument("--size", type=_size, help="WxH, e.g. 512x512")
    p.add_argument("--enhance", action="store_true", default=None,
                   help="let a chat model expand the prompt first (see [enhance] in the settings)")
    job_options(p)

    p = sub.add_parser("variation", help="a variation of an earlier job's image")
    p.add_argument("job_id", type=int)
    p.add_argument("--strength", type=float, help="how far from the source, 0-1 (default from config)")
    p.add_argument("--prompt", default="", help="a new prompt (default: the source job's)")
    job_options(p)

    p = sub.add_parser("edit", help="repaint an image (where the mask is white) from a prompt")
    p.add_argument("image", type=Path)
    p.add_argument("prompt")
    p.add_argument("--mask", type=Path, help="PNG mask: white is repainted, black is kept")
    p.add_argument("--negative")
    job_options(p)

    p = sub.add_parser("upscale", help="enlarge an earlier job's image")
    p.add_argument("job_id", type=int)
    p.add_argument("--model")
    p.add_argument("--user", type=_user, default=DEFAULT_USER)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("jobs", help="list recent jobs")
    p.add_argument("--user", type=_user)
    p.add_argument("--limit", type=_limit, default=20, help="how many (1-1000)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("budget", help="show, set or grant a user's budget")
    p.add_argument("action", choices=["show", "set", "grant"])
    p.add_argument("user", type=_user)
    p.add_argument("amount", type=_usd, nargs="?", help="USD (set, grant)")

    sub.add_parser("models", help="list the models that can be used, and why others cannot")
    sub.add_parser("check", help="validate the settings and report which generators are usable")
    sub.add_parser("serve", help="serve stored images over HTTP")
    sub.add_parser("run", help="run the Discord bot (token from $DISCORD_TOKEN) and the image server")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    handler = {
        "imagine": _job_command, "variation": _job_command, "edit": _job_command,
        "upscale": _job_command, "jobs": _jobs, "budget": _budget, "models": _models,
        "check": _check, "serve": _serve, "run": _run_bot,
    }[args.command]
    try:
        return handler(settings, args)
    except ConfigError as exc:  # settings that only fail when a generator is built
        return _fail(str(exc), EXIT_USAGE)
    except KeyboardInterrupt:
        print("easel: interrupted; a job in flight was cancelled and refunded", file=sys.stderr)
        return 130
    except Terminated:
        print("easel: terminated; a job in flight was cancelled and refunded", file=sys.stderr)
        return 143


class Terminated(Exception):
    """SIGTERM: the job in flight is cancelled, and so refunded, as on Ctrl-C."""


async def _cancel_on_sigterm(work):
    """Run `work`; SIGTERM cancels it (the service refunds a cancelled job) and raises Terminated."""
    import signal

    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    terminated = False

    def on_term() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_term)
    except (NotImplementedError, RuntimeError):  # not POSIX, or not the main thread
        pass
    try:
        return await task
    except asyncio.CancelledError:
        if terminated:
            raise Terminated() from None
        raise
    finally:
        try:
            loop.remove_signal_handler(signal.SIGTERM)
        except (NotImplementedError, RuntimeError):
            pass


def _app(settings):
    """The app as every command starts it: wired, then recovered from any crash."""
    from .bootstrap import bootstrap

    app = bootstrap(settings)
    app.recover()
    return app


def _read_file(path: Path | None, limit: int, what: str) -> bytes | None:
    """A regular file of at most `limit` bytes, read no further than that."""
    from .files import FileRefused, read_bounded

    if path is None:
        return None
    try:
        return read_bounded(path, limit, what)
    except FileRefused as exc:
        raise SystemExit(_fail(str(exc), EXIT_USAGE)) from None


def _fail(message: str, code: int) -> int:
    print(f"easel: {_printable(message)}", file=sys.stderr)
    return code


def _job_command(settings, args) -> int:
    from .core.models import GenerationParams, JobRequest, Kind, Requester

    params = GenerationParams(
        prompt=getattr(args, "prompt", "") or "",
        negative_prompt=getattr(args, "negative", None),
        seed=getattr(args, "seed", None),
        size=getattr(args, "size", None),
        steps=args.steps if "steps" in args else None,
        guidance=args.guidance if "guidance" in args else None,
        strength=getattr(args, "strength", None),
        model=args.model,
        options={k: v for k in OPTION_FLAGS if (v := getattr(args, k, None))},
    )
    request = JobRequest(
        Kind(args.command), Requester(args.user), params,
        source_job_id=getattr(args, "job_id", None),
        enhance=getattr(args, "enhance", None),
        image=_read_file(getattr(args, "image", None), settings.generation.max_upload_bytes, "image"),
        mask=_read_file(getattr(args, "mask", None), settings.generation.max_upload_bytes, "mask"),
    )
    return asyncio.run(_cancel_on_sigterm(_run_job(settings, request, as_json=args.json)))


async def _run_job(settings, request, *, as_json: bool) -> int:
    app = _app(settings)
    bar = None if as_json else ProgressBar(sys.stderr)
    try:
        outcome = await app.service.submit(request, on_event=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
        await app.close()
    if as_json:
        print(json.dumps(outcome.as_dict()))
    elif outcome.ok:
        job = outcome.job
        print(f"job {job.id}: {job.width}x{job.height}, seed {job.seed}, model {job.model} ({job.provider}), "
              f"cost ${job.cost_micros / 1e6:.4f}, balance ${outcome.balance_usd:.4f}")
        if job.original_prompt:
            print(f"enhanced prompt: {_printable(job.prompt)}")
            print(f"typed prompt:    {_printable(job.original_prompt)}")
        if job.revised_prompt:
            print(f"revised prompt: {job.revised_prompt}")
        if job.note:
            print(f"note: {job.note}")
        print(f"image: {outcome.image_path}")
        print(f"url:   {job.image_url}")
    else:
        where = f"job {outcome.job.id} " if outcome.job else ""
        print(f"easel: {where}{outcome.status}: {_printable(outcome.error)}", file=sys.stderr)
    return exit_status(outcome)


def exit_status(outcome) -> int:
    from .core.models import ErrorCode

    if outcome.ok:
        return EXIT_OK
    return {ErrorCode.USAGE: EXIT_USAGE, ErrorCode.NOT_FOUND: EXIT_USAGE, ErrorCode.FORBIDDEN: EXIT_USAGE,
            ErrorCode.BLOCKED: EXIT_BLOCKED, ErrorCode.OVER_BUDGET: EXIT_OVER_BUDGET,
            ErrorCode.SPEND_CAP: EXIT_OVER_BUDGET}.get(outcome.error_code, EXIT_FAILED)


class ProgressBar:
    """One line on the terminal: the queue position, then the share of steps done."""

    def __init__(self, stream, width: int = 30):
        self.stream, self.width = stream, width
        self.live = stream.isatty()
        self._last = ""

    def update(self, event) -> None:
        if event.state == "queued":
            text = f"queued, position {event.position}"
        elif event.state == "running":
            text = "running"
        else:
            done = int(self.width * (event.fraction or 0))
            text = f"[{'#' * done}{'.' * (self.width - done)}] {100 * (event.fraction or 0):3.0f}%"
        if text == self._last:
            return
        self._last = text
        if self.live:
            self.stream.write("\r\033[K" + text)
        elif event.state != "progress" or event.fraction == 1.0:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self._last:
            self.stream.write("\r\033[K")
            self.stream.flush()


def _jobs(settings, args) -> int:
    async def read():
        app = _app(settings)
        try:
            return await app.results.recent(args.user, args.limit)
        finally:
            await app.close()

    jobs = asyncio.run(read())
    if args.json:
        print(json.dumps([_job_dict(j) for j in jobs]))
        return EXIT_OK
    for j in jobs:
        detail = _printable(j.image_url if j.status == "done" else (j.error or ""))
        print(f"{j.id:>6}  {j.status:<9} {j.kind:<9} {_printable(j.user_id):<12} {_printable(j.model or '-'):<16} "
              f"seed {j.seed if j.seed is not None else '-':<10} ${j.cost_micros / 1e6:.4f}  "
              f"{j.prompt[:40]!r}  {detail}")
    return EXIT_OK


def _job_dict(job) -> dict:
    """A job as JSON: its fields, with the parameters flat beside them."""
    from dataclasses import asdict

    data = asdict(job)
    params = data.pop("params")
    width, height = params.pop("size") or (None, None)
    return {**data, **params, "width": width, "height": height}


def _budget(settings, args) -> int:
    from .core.models import Refusal, usd_to_micros

    actor = f"cli:{os.environ.get('USER', '?')}"

    async def act():
        app = _app(settings)
        try:
            if args.action == "set":
                return await app.accounts.set_balance(args.user, usd_to_micros(args.amount), actor)
            if args.action == "grant":
                return await app.accounts.grant(args.user, usd_to_micros(args.amount), actor)
            return (await app.accounts.usage(args.user)).balance
        finally:
            await app.close()

    if args.action != "show" and args.amount is None:
        return _fail(f"budget {args.action} needs an amount in USD", EXIT_USAGE)
    try:
        b = asyncio.run(act())
    except Refusal as exc:
        return _fail(str(exc), EXIT_USAGE)
    if hasattr(b, "describe"):  # a set or a grant says what it did
        print(f"{args.user}: {b.describe()}")
    print(f"{args.user}: balance ${b.balance_micros / 1e6:.4f}, held for running jobs "
          f"${b.reserved_micros / 1e6:.4f}, available ${b.available_micros / 1e6:.4f}")
    return EXIT_OK


def _models(settings, args) -> int:
    from .bootstrap import build_generators, build_router
    from .core.models import KINDS

    router = build_router(settings, build_generators(settings))
    for spec in sorted(router.models(), key=lambda s: (s.provider, s.name)):
        aliases = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        kinds = ", ".join(k for k in KINDS if k in spec.kinds)
        seed = "seeded" if spec.honours_seed else "no seed"
        options = "".join(f"; {k}: {'|'.join(v)}" for k, v in spec.options.items())
        default = "  [default]" if spec.name == settings.generation.default_model else ""
        print(f"{spec.name:<24} {spec.provider:<10} {kinds}; {seed}{options}{aliases}{default}")
    for provider, reason in router.unavailable().items():
        print(f"{provider}: unavailable: {reason}")
    return EXIT_OK


def _check(settings, args) -> int:
    from .bootstrap import build_generators, build_image_screen, build_router
    from .core.routing import UnknownModel

    print(f"settings: {settings.source or 'built-in defaults'} (valid)")
    db_path = settings.path(settings.storage.database)
    images = settings.path(settings.storage.images_dir)
    print(f"database: {db_path}")
    print(f"images:   {images} -> {settings.storage.public_url}/images/<sha256>.png")
    router = build_router(settings, build_generators(settings))
    for spec in router.models():
        print(f"model {spec.name} ({spec.provider}): usable")
    for provider, reason in router.unavailable().items():
        print(f"generator {provider}: not usable: {reason}")
    screen = build_image_screen(settings)
    reason = screen.unavailable_reason()
    print(f"image screening: {settings.moderation.image_classifier}: " + (f"not usable: {reason}" if reason else "usable"))
    ok = reason is None
    try:
        router.resolve(settings.generation.default_model)
        print(f"default model {settings.generation.default_model}: usable")
    except UnknownModel as exc:
        print(f"default model: not usable: {exc}")
        ok = False
    for model, fallback in settings.routing.fallbacks.items():
        unknown = [name for name in (model, fallback) if not _known(router, name)]
        if unknown:
            print(f"fallback {model} -> {fallback}: not usable: no model {', '.join(map(repr, unknown))}")
            ok = False
    upscaler = settings.generators.local.upscaler
    if upscaler and upscaler.startswith(("/", ".", "~")) and not settings.path(upscaler).exists():
        print(f"upscaler {upscaler}: not usable: {settings.path(upscaler)} does not exist")
        ok = False
    return EXIT_OK if ok else EXIT_FAILED


def _known(router, name: str) -> bool:
    from .core.routing import UnknownModel

    try:
        router.resolve(name)
    except UnknownModel:
        return False
    return True


def _serve(settings, args) -> int:
    from aiohttp import web

    from storage.blobs import LocalBlobStore
    from storage.server import make_image_app

    from .config import listen_error

    store = LocalBlobStore(settings.path(settings.storage.images_dir), settings.storage.public_url)
    print(f"serving {store.root} at http://{settings.server.host}:{settings.server.port}/images/")
    try:
        web.run_app(make_image_app(store), host=settings.server.host, port=settings.server.port,
                    print=None)
    except OSError as exc:  # the address is in use, or the host does not resolve
        return _fail(str(listen_error(settings, exc)), EXIT_USAGE)
    return EXIT_OK


def _run_bot(settings, args) -> int:
    import importlib.util
    import logging

    if importlib.util.find_spec("discord") is None:
        return _fail("the Discord bot needs the discord extra: pip install 'easel[discord]'", EXIT_USAGE)
    if settings.discord.token() is None:
        return _fail(f"the bot token is read from ${settings.discord.token_env}, which is not set", EXIT_USAGE)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .discord.client import serve

    async def main() -> None:
        app = _app(settings)
        try:
            await serve(settings, app)
        finally:
            await app.close()

    asyncio.run(main())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
