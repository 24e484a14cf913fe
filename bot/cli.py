"""The `easel` command line. Heavy modules (torch, the pipeline) are imported only by the
commands that need them, so `easel --help` answers at once."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import replace
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


# Terminal output (rich tables, ✓/✗ marks, a live progress bar) goes only to a stream that is a
# terminal; piped output stays plain text that scripts and tests parse. EASEL_FORCE_TERMINAL=1
# treats every stream as a terminal (tests use it to check the rich output; a recording tool may
# too), EASEL_FORCE_TERMINAL=0 treats none as one. rich is imported only when it is used, so
# `easel --help` stays quick.
FORCE_TERMINAL_ENV = "EASEL_FORCE_TERMINAL"


def _is_terminal(stream) -> bool:
    forced = os.environ.get(FORCE_TERMINAL_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _console(stream):
    """A rich console on `stream`, which _is_terminal said is a terminal."""
    from rich.console import Console

    return Console(file=stream, force_terminal=True, highlight=False, emoji=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="easel", description="Self-hosted AI image generation: command line and Discord bot."
    )
    parser.add_argument("--config", metavar="PATH", help="settings file (default: $EASEL_CONFIG, else ./easel.toml, else built-in defaults)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _job_parsers(sub)
    _other_parsers(sub)
    return parser


def _job_options(p, *, seed=True):
    if seed:
        p.add_argument("--seed", type=_seed, help="seed (default: chosen at random and recorded)")
    p.add_argument("--model", help="model name or alias (see `easel models`)")
    p.add_argument("--steps", type=int, help="inference steps")
    p.add_argument("--guidance", type=float, help="guidance scale")
    p.add_argument("--user", type=_user, default=DEFAULT_USER, help=f"whose budget pays (default: {DEFAULT_USER})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    for name in OPTION_FLAGS:  # model options (see `easel models`): quality, sampler, ...
        p.add_argument(f"--{name}", help=f"{name}, for models that take it (see `easel models`)")
    p.add_argument("--lora", action="append", metavar="NAME[:WEIGHT]",
                   help="a LoRA of the local model (up to 3; see [generators.local.loras])")


def _job_parsers(sub) -> None:
    p = sub.add_parser("imagine", help="make an image from a prompt (inline --seed/--no/--ar flags work too)")
    p.add_argument("prompt")
    p.add_argument("--negative", help="what to keep out of the image")
    p.add_argument("--size", type=_size, help="WxH, e.g. 512x512")
    p.add_argument("--enhance", action="store_true", default=None,
                   help="let a chat model expand the prompt first (see [enhance] in the settings)")
    p.add_argument("--control", metavar="NAME", help="a ControlNet (see [generators.local.controlnets])")
    control = p.add_mutually_exclusive_group()
    control.add_argument("--control-image", type=Path, metavar="PATH", help="the image the ControlNet follows")
    control.add_argument("--control-job", type=int, metavar="JOB_ID", help="or an earlier job's image")
    p.add_argument("--control-scale", type=float, metavar="F", help="how strongly it follows it (0-2, default 1)")
    _job_options(p)

    p = sub.add_parser("variation", help="a variation of an earlier job's image")
    p.add_argument("job_id", type=int)
    p.add_argument("--strength", type=float, help="how far from the source, 0-1 (default from config)")
    p.add_argument("--prompt", default="", help="a new prompt (default: the source job's)")
    _job_options(p)

    p = sub.add_parser("edit", help="repaint an image (where the mask is white) from a prompt")
    p.add_argument("image", type=Path)
    p.add_argument("prompt")
    p.add_argument("--mask", type=Path, help="PNG mask: white is repainted, black is kept")
    p.add_argument("--negative")
    _job_options(p)

    for name, what in (("zoom", "zoom out (2x) of an earlier job's image"),
                       ("pan", "extend an earlier job's image by half to one side")):
        p = sub.add_parser(name, help=f"{what}; its own pixels are kept exactly (outpainting)")
        p.add_argument("job_id", type=int)
        if name == "pan":
            p.add_argument("direction", choices=["left", "right", "up", "down"])
        p.add_argument("--prompt", default="", help="what to draw around it (default: the source job's prompt)")
        _job_options(p)

    p = sub.add_parser("upscale", help="enlarge an earlier job's image")
    p.add_argument("job_id", type=int)
    p.add_argument("--model")
    p.add_argument("--user", type=_user, default=DEFAULT_USER)
    p.add_argument("--json", action="store_true")


def _moderation_parser(sub) -> None:
    p = sub.add_parser("moderation", help="test the prompt rules (check), see blocks (log, stats)")
    actions = p.add_subparsers(dest="moderation_action", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="screen prompts (or - : one a line from stdin); generates nothing")
    check.add_argument("prompts", nargs="+", metavar="PROMPT")
    check.add_argument("--channel", choices=["normal", "nsfw"], default="normal",
                       help="screen as in an ordinary or an age-restricted channel")
    log = actions.add_parser("log", help="recent moderation blocks")
    log.add_argument("--user", type=_user)
    log.add_argument("--limit", type=_limit, default=50, help="how many (1-1000)")
    log.add_argument("--json", action="store_true")
    stats = actions.add_parser("stats", help="blocks per rule over a period")
    stats.add_argument("--period", choices=["day", "week", "month"], default="week")
    stats.add_argument("--json", action="store_true")


def _other_parsers(sub) -> None:
    from . import cli_cluster, cli_provenance, cli_storage

    _moderation_parser(sub)
    cli_storage.add_parser(sub)
    cli_cluster.add_parser(sub)
    cli_provenance.add_parser(sub)
    p = sub.add_parser("jobs", help="list recent jobs")
    p.add_argument("--user", type=_user)
    p.add_argument("--limit", type=_limit, default=20, help="how many (1-1000)")
    p.add_argument("--json", action="store_true")

    from . import cli_budget

    cli_budget.add_parser(sub)

    sub.add_parser("models", help="list the models that can be used, and why others cannot")
    sub.add_parser("check", help="validate the settings and report which generators are usable")
    sub.add_parser("doctor", help="check the whole set-up (storage, generators, Discord, the "
                                  "image server's URL) and say what to fix")
    sub.add_parser("serve", help="serve stored images over HTTP")
    sub.add_parser("run", help="run the Discord bot (token from $DISCORD_TOKEN) and the image server")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    handler = {
        "imagine": _job_command, "variation": _job_command, "edit": _job_command,
        "upscale": _job_command, "zoom": _job_command, "pan": _job_command, "jobs": _jobs, "budget": _budget, "models": _models,
        "check": _check, "doctor": _doctor, "moderation": _moderation, "serve": _serve, "run": _run_bot,
        "storage": _storage, "provenance": _provenance, "cluster": _cluster,
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
        options={k: v for k in OPTION_FLAGS if (v := getattr(args, k, None))} | _control_options(args),
    )
    outpaint = {"zoom": "zoom", "pan": getattr(args, "direction", None)}.get(args.command)
    request = JobRequest(
        Kind.EDIT if outpaint else Kind(args.command), Requester(args.user), params,
        outpaint=outpaint,
        source_job_id=next((j for j in (getattr(args, "job_id", None), getattr(args, "control_job", None))
                            if j is not None), None),
        enhance=getattr(args, "enhance", None),
        image=_read_file(getattr(args, "image", None) or getattr(args, "control_image", None),
                         settings.generation.max_upload_bytes, "image"),
        mask=_read_file(getattr(args, "mask", None), settings.generation.max_upload_bytes, "mask"),
    )
    return asyncio.run(_cancel_on_sigterm(_run_job(settings, request, as_json=args.json)))


def _control_options(args) -> dict[str, str]:
    """--lora, --control and --control-scale as the model options the local generator reads."""
    options = {"lora": ",".join(args.lora)} if getattr(args, "lora", None) else {}
    if getattr(args, "control", None):
        options["control"] = args.control
    if getattr(args, "control_scale", None) is not None:
        options["control_scale"] = f"{args.control_scale:g}"
    return options


async def _run_job(settings, request, *, as_json: bool) -> int:
    app = _app(settings)
    bar = None if as_json else ProgressBar(sys.stderr, loads_model=_loads_model(app, request))
    try:
        outcome = await app.service.submit(request, on_event=bar.update if bar else None)
        if outcome.job is not None:
            outcome = replace(outcome, job=(await app.results.fresh([outcome.job]))[0])
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
        lifts = ""
        if outcome.retry_at:
            from datetime import UTC, datetime

            lifts = f" (until {datetime.fromtimestamp(outcome.retry_at, UTC):%Y-%m-%d %H:%M} UTC)"
        print(f"easel: {where}{outcome.status}: {_printable(outcome.error)}{lifts}", file=sys.stderr)
    return exit_status(outcome)


def exit_status(outcome) -> int:
    from .core.models import ErrorCode

    if outcome.ok:
        return EXIT_OK
    return {ErrorCode.USAGE: EXIT_USAGE, ErrorCode.NOT_FOUND: EXIT_USAGE, ErrorCode.FORBIDDEN: EXIT_USAGE,
            ErrorCode.BLOCKED: EXIT_BLOCKED, ErrorCode.OVER_BUDGET: EXIT_OVER_BUDGET,
            ErrorCode.SPEND_CAP: EXIT_OVER_BUDGET, ErrorCode.RATE_LIMITED: EXIT_OVER_BUDGET,
            ErrorCode.SUSPENDED: EXIT_OVER_BUDGET, ErrorCode.BUSY: EXIT_OVER_BUDGET}.get(outcome.error_code, EXIT_FAILED)


class ProgressBar:
    """The job's progress on `stream` (stderr). On a terminal: a rich progress bar whose
    description says "starting" until the first event, then the queue position, then (a local
    model takes seconds to load) "loading model…" until the first step, then the share of steps
    done; it is erased when the job ends. Elsewhere: one plain line per state, and 100%."""

    def __init__(self, stream, width: int = 30, *, loads_model: bool = True):
        self.stream, self.width = stream, width
        self.live = _is_terminal(stream)
        self.loads_model = loads_model
        self._last = ""
        self._progress = None
        if self.live:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn

            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=width),
                TaskProgressColumn(), console=_console(stream), transient=True,
            )
            self._task = self._progress.add_task("starting", total=None)
            self._progress.start()

    def update(self, event) -> None:
        if self._progress is not None:
            self._update_live(event)
            return
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
        if event.state != "progress" or event.fraction == 1.0:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _update_live(self, event) -> None:
        assert self._progress is not None
        if event.state == "queued":
            text, fraction = f"queued, position {event.position}", None
        elif event.state == "running":
            text, fraction = ("loading model…" if self.loads_model else "running"), None
        else:
            text, fraction = "generating", min(max(event.fraction or 0.0, 0.0), 1.0)
        changed = text != self._last
        self._last = text
        if fraction is None:
            self._progress.update(self._task, description=text, total=None)
        else:
            self._progress.update(self._task, description=text, total=1.0, completed=fraction)
        if changed:
            self._progress.refresh()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _loads_model(app, request) -> bool:
    """Whether the job is likely served by the local generator (which loads a model first)."""
    try:
        model = request.params.model or app.settings.generation.default_model
        return app.router.resolve(model).generator.provider == "local"
    except Exception:  # an unknown model: the service says so in a moment
        return False


def _jobs(settings, args) -> int:
    async def read():
        app = _app(settings)
        try:
            return await app.results.fresh(await app.results.recent(args.user, args.limit))
        finally:
            await app.close()

    jobs = asyncio.run(read())
    if args.json:
        print(json.dumps([_job_dict(j) for j in jobs]))
        return EXIT_OK
    if _is_terminal(sys.stdout):
        _print_jobs_table(jobs)
        return EXIT_OK
    for j in jobs:
        detail = _printable(j.image_url if j.status == "done" else (j.error or ""))
        print(f"{j.id:>6}  {j.status:<9} {j.kind:<9} {_printable(j.user_id):<12} {_printable(j.model or '-'):<16} "
              f"seed {j.seed if j.seed is not None else '-':<10} ${j.cost_micros / 1e6:.4f}  "
              f"{j.prompt[:40]!r}  {detail}")
    return EXIT_OK


_STATUS_STYLES = {"done": "green", "failed": "red", "blocked": "yellow", "refused": "yellow",
                  "cancelled": "dim", "queued": "cyan", "running": "cyan"}


def _print_jobs_table(jobs) -> None:
    """`easel jobs` on a terminal: the plain listing's fields in an aligned table. Every cell is
    a Text (never markup) of _printable text: stored text reaches the terminal as text."""
    from rich.table import Table
    from rich.text import Text

    console = _console(sys.stdout)
    if not jobs:
        console.print(Text("no jobs", style="dim"))
        return
    table = Table(header_style="bold")
    for name in ("id", "status", "kind", "user", "model", "seed", "cost", "prompt", "detail"):
        right = name in ("id", "seed", "cost")
        table.add_column(name, justify="right" if right else "left",
                         overflow="fold" if name in ("prompt", "detail") else "ellipsis")
    for j in jobs:
        prompt = _printable(j.prompt)
        detail = _printable(j.image_url if j.status == "done" else (j.error or ""))
        table.add_row(
            Text(str(j.id)), Text(str(j.status), style=_STATUS_STYLES.get(str(j.status), "")),
            Text(str(j.kind)), Text(_printable(j.user_id)), Text(_printable(j.model or "-")),
            Text(str(j.seed) if j.seed is not None else "-"), Text(f"${j.cost_micros / 1e6:.4f}"),
            Text(prompt if len(prompt) <= 40 else prompt[:39] + "…"), Text(detail),
        )
    console.print(table)


def _moderation(settings, args) -> int:
    """`moderation check` screens with the configured prompt rules and opens nothing else;
    `log` and `stats` read the moderation log."""
    if args.moderation_action == "check":
        from .bootstrap import build_prompt_screen

        screen = build_prompt_screen(settings)
        prompts = sys.stdin.read().splitlines() if args.prompts == ["-"] else args.prompts
        for i, prompt in enumerate(prompts):
            verdict = screen.screen_prompt(prompt, nsfw_channel=args.channel == "nsfw")
            print(json.dumps({"prompt_index": i, "blocked": not verdict.allowed, "category": verdict.rule,
                              "rule": verdict.rule, "score": verdict.score}))
        return EXIT_OK
    import time

    from .core.models import period_start

    app = _app(settings)
    try:
        if args.moderation_action == "stats":
            since = period_start(args.period, time.time())
            counts = app.moderation.counts(since)
            if args.json:
                print(json.dumps({"period": args.period, "since": since, "blocks": counts}))
            else:
                print(f"blocks this {args.period}: {sum(counts.values())}")
                for rule, n in counts.items():
                    print(f"{_printable(rule):<20} {n}")
            return EXIT_OK
        events = app.moderation.recent(user_id=args.user, limit=args.limit)
    finally:
        asyncio.run(app.close())
    if args.json:
        from dataclasses import asdict

        print(json.dumps([asdict(e) for e in events]))
        return EXIT_OK
    for e in events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.created_at))
        where = f"guild {e.guild_id}" if e.guild_id else "-"
        text = f"  {e.prompt[:60]!r}" if e.prompt else ""
        print(f"{when}  {_printable(e.user_id):<12} {where:<24} {e.stage:<8} {_printable(e.rule):<16} "
              f"job {e.job_id or '-'}{text}")
    return EXIT_OK


def _job_dict(job) -> dict:
    """A job as JSON: its fields, with the parameters flat beside them."""
    from dataclasses import asdict

    data = asdict(job)
    params = data.pop("params")
    width, height = params.pop("size") or (None, None)
    return {**data, **params, "width": width, "height": height}


def _budget(settings, args) -> int:
    from . import cli_budget

    return cli_budget.run(settings, args)


def _storage(settings, args) -> int:
    from . import cli_storage

    return cli_storage.run(settings, args)


def _cluster(settings, args) -> int:
    from . import cli_cluster

    return cli_cluster.run(settings, args)


def _provenance(settings, args) -> int:
    from . import cli_provenance

    return cli_provenance.run(settings, args)


def _models(settings, args) -> int:
    from .bootstrap import build_generators, build_router
    from .core.models import KINDS

    generators = build_generators(settings)
    router = build_router(settings, generators)
    loaded = {name: where for g in generators for name, where in getattr(g, "loaded", dict)().items()}
    for spec in sorted(router.models(), key=lambda s: (s.provider, s.name)):
        aliases = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        kinds = ", ".join(k for k in KINDS if k in spec.kinds)
        seed = "seeded" if spec.honours_seed else "no seed"
        options = "".join(f"; {k}: {'|'.join(v)}" for k, v in spec.options.items())
        control = "".join(f"; {what}: {', '.join(names)}" for what, names in
                          (("loras", spec.loras), ("controlnets", spec.controlnets)) if names)
        state = f"  [{loaded[spec.name]}]" if spec.name in loaded else ""
        default = "  [default]" if spec.name == settings.generation.default_model else ""
        print(f"{spec.name:<24} {spec.provider:<10} {kinds}; {seed}{options}{control}{aliases}{state}{default}")
    for provider, reason in router.unavailable().items():
        print(f"{provider}: unavailable: {reason}")
    return EXIT_OK


def _check(settings, args) -> int:
    from .bootstrap import build_generators, build_image_screen, build_router, image_screen_names
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
    names = image_screen_names(settings)
    which = ", ".join(names) if names else "none (outputs are not screened)"
    print(f"image screening: {which}: " + (f"not usable: {reason}" if reason else "usable"))
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


# ---- easel doctor ----------------------------------------------------------------------------

OK, FAIL, SKIP = "ok", "fail", "skip"
_MARKS = {OK: ("✓", "green", "ok  "), FAIL: ("✗", "red", "FAIL"), SKIP: ("–", "dim", "skip")}


class _Rollback(Exception):
    """Undoes the doctor's probe write."""


def _doctor(settings, args) -> int:
    """Every part of the set-up, one line each: ✓ (ok), ✗ (FAIL, with what to fix) or – (not set
    up, and not needed). Exit 0 only when nothing failed. Nothing is generated, and no secret is
    shown: keys and the token are only said to be set or not."""
    results: list[tuple[str, str, str, str]] = []  # (state, name, detail, fix)

    def run(check, *a) -> None:
        try:
            results.extend(check(*a))
        except Exception as exc:  # a check that breaks is a failed check, not a traceback
            name = check.__name__.removeprefix("_doctor_").replace("_", " ")
            results.append((FAIL, name, f"the check itself failed: {type(exc).__name__}: {exc}",
                            "report this; the rest of the checks ran"))

    results.append((OK, "settings", f"{settings.source or 'built-in defaults'} (valid)", ""))
    run(_doctor_storage, settings)
    run(_doctor_generators, settings)
    run(_doctor_image_screen, settings)
    run(_doctor_discord, settings)
    run(_doctor_public_url, settings)

    terminal = _is_terminal(sys.stdout)
    console = _console(sys.stdout) if terminal else None
    for state, name, detail, fix in results:
        mark, style, word = _MARKS[state]
        tail = f"; fix: {fix}" if state == FAIL and fix else ""
        if console is None:
            print(f"{word} {_printable(name)}: {_printable(detail)}{_printable(tail)}")
        else:
            from rich.text import Text

            console.print(Text.assemble((mark, f"bold {style}"), " ", (_printable(name), "bold"), ": ",
                                        _printable(detail), (_printable(tail), "yellow")), soft_wrap=True)
    failed = [name for state, name, _, _ in results if state == FAIL]
    summary = (f"{len(failed)} of {len(results)} checks failed: {', '.join(failed)}" if failed
               else f"all {len(results)} checks passed")
    if console is None:
        print(f"doctor: {summary}")
    else:
        from rich.text import Text

        console.print(Text(summary, style="bold red" if failed else "bold green"), soft_wrap=True)
    return EXIT_FAILED if failed else EXIT_OK


def _doctor_storage(settings):
    """The images folder and the database, as every command opens them (open_storage)."""
    import sqlite3
    from urllib.parse import urlsplit

    from storage.db import Database
    from storage.errors import StorageError

    from .bootstrap import open_storage
    from .config import ConfigError

    db_fix = ("point storage.database at an SQLite file the easel user can write, in a folder "
              "that exists or can be made")
    images_fix = "point storage.images_dir at a folder the easel user can write to"
    images_dir = settings.path(settings.storage.images_dir)
    db_path = settings.path(settings.storage.database)
    existed = db_path.is_file()
    db = None
    out = []
    label, where = "images folder", f"{images_dir} (writable)"
    if settings.storage.backend == "s3":
        s3 = settings.storage.s3
        host = urlsplit(s3.endpoint_url).hostname if s3.endpoint_url else "AWS"
        label, where = "image store", f"S3 bucket {s3.bucket} ({host}; writable)"
        images_fix = "check storage.s3 and the AWS credentials in the environment"
    try:
        db, blobs = open_storage(settings)
        getattr(blobs, "close", lambda: None)()
        out.append((OK, label, where, ""))
    except ConfigError as exc:
        if not str(exc).startswith(("storage.images_dir", "storage.s3")):
            out.append((OK, label, where, ""))
            if "newer than this easel" in str(exc):
                db_fix = "upgrade easel to the version that wrote it, or point storage.database at another file"
            return [*out, (FAIL, "database", str(exc), db_fix)]
        out.append((FAIL, label, str(exc), images_fix))
        try:  # open_storage stopped at the images folder: the database on its own
            db = Database(db_path)
        except StorageError as exc:
            return [*out, (FAIL, "database", f"storage.database: {exc}", db_fix)]
    try:
        version = db.schema_version
        try:
            with db.transaction() as conn:  # a write that is rolled back: the file is writable
                conn.execute("CREATE TABLE easel_doctor_probe (x)")
                raise _Rollback()
        except _Rollback:
            pass
        except sqlite3.Error as exc:
            return [*out, (FAIL, "database", f"{db_path}: not writable ({exc})", db_fix)]
    finally:
        db.close()
    created = "" if existed else ", created now"
    return [*out, (OK, "database", f"{db_path} (schema version {version}, writable{created})", "")]


def _doctor_generators(settings):
    """Each generator of the registry: usable, off, not set up, or why it cannot be used; then
    the default model and the fallbacks."""
    from .bootstrap import build_generators, build_router
    from .config import GENERATORS, ConfigError
    from .core.routing import UnknownModel

    try:
        generators = build_generators(settings)
    except ConfigError as exc:
        return [(FAIL, "generators", str(exc), "fix the setting it names")]
    router = build_router(settings, generators)
    built = {g.provider: g for g in generators}
    unavailable = router.unavailable()
    in_file = settings.generators.model_fields_set  # the [generators.*] tables the settings set
    out = []
    for entry in GENERATORS:
        name, section = entry.name, entry.section(settings)
        label = f"generator {name}"
        key_env = getattr(section, "api_key_env", None)
        key = f"; key set (${key_env})" if key_env and section.api_key() else ""
        if not section.enabled:
            out.append((SKIP, label, f"off (generators.{name}.enabled = false)", ""))
        elif name in unavailable:
            out.append((FAIL, label, f"not usable: {unavailable[name]}{key}",
                        f"install what it names, or set generators.{name}.enabled = false"))
        elif name in built:
            models = sorted(s.name for s in built[name].models())
            out.append((OK, label, f"usable: {len(models)} model{'s' * (len(models) != 1)} ({', '.join(models)}){key}", ""))
        elif key_env is None:  # a self-hosted server's generator (ComfyUI, A1111) with no servers listed
            hint = getattr(section, "setup_hint", f"list generators.{name}.servers to use it")
            out.append((SKIP, label, f"not set up ({hint})", ""))
        elif name in in_file:  # set up in the settings, but its key is not in the environment
            out.append((FAIL, label, f"enabled in the settings, but ${key_env} is not set",
                        f"put {key_env}=<key> in the environment (for systemd: /etc/easel/env), "
                        f"or set generators.{name}.enabled = false"))
        else:
            out.append((SKIP, label, f"not set up (set ${key_env} to use it)", ""))
    default = settings.generation.default_model
    known = ", ".join(sorted(s.name for s in router.models())) or "none"
    try:
        route = router.resolve(default)
        out.append((OK, "default model", f"{default} -> {route.spec.name} ({route.generator.provider})", ""))
    except UnknownModel:
        out.append((FAIL, "default model", f"{default!r} is not a usable model",
                    f"set generation.default_model to a usable model ({known}), or set up its generator"))
    for model, fallback in settings.routing.fallbacks.items():
        unknown = [n for n in (model, fallback) if not _known(router, n)]
        if unknown:
            out.append((FAIL, f"fallback {model} -> {fallback}", f"no model {', '.join(map(repr, unknown))}",
                        f"fix routing.fallbacks: usable models are {known}"))
        else:
            out.append((OK, f"fallback {model} -> {fallback}", "both usable", ""))
    return out


def _doctor_image_screen(settings):
    from .bootstrap import build_image_screen

    classifier = settings.moderation.image_classifier
    if classifier == "none":
        return [(SKIP, "image screen", 'off (moderation.image_classifier = "none")', "")]
    reason = build_image_screen(settings).unavailable_reason()
    if reason:
        return [(FAIL, "image screen", f"{classifier}: not usable: {reason}",
                 "pip install 'easel[nsfw]', or set moderation.image_classifier = \"none\"")]
    return [(OK, "image screen", f"{classifier}: usable", "")]


def _doctor_discord(settings):
    import importlib.util

    env = settings.discord.token_env
    out = []
    if importlib.util.find_spec("discord") is None:
        out.append((FAIL, "discord", "the discord extra is not installed", "pip install 'easel[discord]'"))
    if settings.discord.token() is None:
        out.append((FAIL, "discord token", f"not set (${env})",
                    f"put {env}=<bot token> in the environment (for systemd: /etc/easel/env); "
                    "`easel run` needs it"))
    else:
        out.append((OK, "discord token", f"set (${env})", ""))
    return out


def _doctor_public_url(settings, timeout_s: float = 2.0):
    """GET <public_url>/healthz from this machine: the image URLs easel hands out must work."""
    import ipaddress
    import urllib.error
    import urllib.parse
    import urllib.request

    url = settings.storage.public_url.rstrip("/") + "/healthz"
    fix = "start `easel serve` or `easel run`, or fix storage.public_url"
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    # This machine's own server is asked directly, never through a proxy from the environment.
    handlers = [urllib.request.ProxyHandler({})] if loopback else []
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout_s) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        return [(FAIL, "public URL", f"{url} answered {exc.code}",
                 "storage.public_url must lead to easel's image server (`easel serve` or `easel run`)")]
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return [(FAIL, "public URL", f"{url} is unreachable ({reason})", fix)]
    return [(OK, "public URL", f"{url} answered {status}", "")]


def _serve(settings, args) -> int:
    import signal

    from .config import listen_error
    from .http import make_http_app, start_http

    _logs(settings)
    app = _app(settings)
    http = make_http_app(app)

    async def close(_) -> None:
        await app.close()

    http.on_cleanup.append(close)
    print(f"serving {getattr(app.blobs, 'root', None) or app.blobs.where} at http://{settings.server.host}:{settings.server.port}/images/ "
          f"(and /healthz, /readyz, /metrics)", flush=True)

    async def serve() -> None:
        runner = await start_http(http, settings.server.host, settings.server.port,
                                  access_log=settings.server.access_log)
        _start_notes(app)  # once it listens: not before a failed bind
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(serve())
    except OSError as exc:  # the address is in use, or the host does not resolve
        asyncio.run(app.close())
        return _fail(str(listen_error(settings, exc)), EXIT_USAGE)
    return EXIT_OK


def _logs(settings) -> None:
    from .logs import secrets_of, setup

    setup(settings.logging.format, settings.logging.level, secrets_of(settings))


def _start_notes(app) -> None:
    """What a long-running easel says once at start-up (images unsigned, ...)."""
    import logging

    reason = app.provenance.unsigned_reason() if app.provenance is not None else None
    if reason:
        logging.getLogger("easel").warning("%s", reason)


def _run_bot(settings, args) -> int:
    import importlib.util

    if importlib.util.find_spec("discord") is None:
        return _fail("the Discord bot needs the discord extra: pip install 'easel[discord]'", EXIT_USAGE)
    if settings.discord.token() is None:
        return _fail(f"the bot token is read from ${settings.discord.token_env}, which is not set", EXIT_USAGE)
    _logs(settings)
    from .discord.client import serve

    async def main() -> None:
        app = _app(settings)
        _start_notes(app)
        try:
            await serve(settings, app)
        finally:
            await app.close()

    asyncio.run(main())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
