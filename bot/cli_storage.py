"""`easel storage`: check the stored images (verify), remove the ones no job refers to (gc), copy
the local images folder to the S3 bucket and switch the jobs to it (migrate).

Exit status: 0 all well, 1 problems found (listed), 2 a usage or settings error. Output is a table
on a terminal, plain lines when piped, one JSON object with --json."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 10 * 365 * 86400:
        raise argparse.ArgumentTypeError("must be 0 or more seconds")
    return value


def add_parser(sub) -> None:
    """The `storage` command and its actions, on `easel`'s subparsers."""
    p = sub.add_parser("storage", help="check stored images (verify), remove unreferenced ones (gc), "
                                       "copy them to the S3 bucket (migrate)")
    actions = p.add_subparsers(dest="storage_action", required=True, metavar="ACTION")
    verify = actions.add_parser("verify", help="check that every job's image exists and hashes to its key "
                                               "(exit 1 and a list when not)")
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    gc = actions.add_parser("gc", help="remove the objects no job refers to (a dry run unless --apply)")
    gc.add_argument("--apply", action="store_true", help="remove them (default: only list them)")
    gc.add_argument("--min-age", type=_seconds, default=3600.0, metavar="SECONDS",
                    help="keep objects stored less than this long ago (default 3600: a job stores "
                         "its image just before the row that points to it)")
    gc.add_argument("--json", action="store_true", help="print one JSON object")
    migrate = actions.add_parser("migrate", help="copy the local images folder to [storage.s3] and point "
                                                 "the jobs at it (safe to run again)")
    migrate.add_argument("--to", choices=["s3"], required=True, help="where to: the bucket in [storage.s3]")
    migrate.add_argument("--json", action="store_true", help="print one JSON object")


def run(settings, args) -> int:
    """Run `easel storage <action>`; the exit status."""
    from storage.errors import StorageError

    from .cli import EXIT_FAILED, EXIT_USAGE, _fail
    from .config import ConfigError

    action = {"verify": _verify, "gc": _gc, "migrate": _migrate}[args.storage_action]
    try:
        return action(settings, args)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except StorageError as exc:  # the store failed mid-way; what was done stays done
        return _fail(str(exc), EXIT_FAILED)


@contextmanager
def _opened(settings, backend: str | None = None) -> Iterator[tuple]:
    """The database and a blob store as every command opens them, closed after."""
    from .bootstrap import open_storage

    db, blobs = open_storage(settings, backend=backend)
    try:
        yield db, blobs
    finally:
        db.close()
        close = getattr(blobs, "close", None)
        if close is not None:
            close()


def _verify(settings, args) -> int:
    from storage.maintenance import references, review_references, verify

    from .bootstrap import review_store
    from .cli import EXIT_FAILED, EXIT_OK, _printable

    review = review_store(settings)
    with _opened(settings) as (db, blobs):
        checked = len(references(db)) + (len(review_references(db)) if review is not None else 0)
        problems = verify(db, blobs, review=review)
    if args.json:
        print(json.dumps({"checked": checked, "problems": [p.as_dict() for p in problems]}))
    else:
        _show(["store", "object", "problem", "referred to by"],
              [[p.store, f"{p.key}.png", p.problem + (f" ({p.detail})" if p.detail else ""),
                ", ".join(p.referrers)] for p in problems])
        word = "problem" if len(problems) == 1 else "problems"
        print(_printable(f"{checked} objects checked: " + (f"{len(problems)} {word}" if problems else "all intact")))
    return EXIT_FAILED if problems else EXIT_OK


def _gc(settings, args) -> int:
    from storage.maintenance import collect_garbage

    from .cli import EXIT_OK

    with _opened(settings) as (db, blobs):
        names = collect_garbage(db, blobs, dry_run=not args.apply, min_age_s=args.min_age)
    if args.json:
        print(json.dumps({"dry_run": not args.apply, "objects": names}))
        return EXIT_OK
    _show(["object"], [[name] for name in names])
    if args.apply:
        print(f"removed {len(names)} objects no job refers to")
    else:
        print(f"{len(names)} objects no job refers to; a dry run: pass --apply to remove them")
    return EXIT_OK


def _migrate(settings, args) -> int:
    from storage.maintenance import migrate

    from .cli import EXIT_FAILED, EXIT_OK, _printable

    with _opened(settings, backend="local") as (db, src), _opened(settings, backend="s3") as (_, dst):
        report = migrate(db, src, dst)
        where = dst.where
    if args.json:
        print(json.dumps({"to": args.to, **report.as_dict()}))
    else:
        _show(["object", "problem", "referred to by"],
              [[f"{p.key}.png", p.problem + (f" ({p.detail})" if p.detail else ""), ", ".join(p.referrers)]
               for p in report.problems])
        print(_printable(f"{where}: copied {report.copied} objects ({report.bytes_copied / 1e6:.1f} MB), "
                         f"{report.present} already there; {report.rows_switched} jobs switched to it"))
        if report.problems:
            print(f"{len(report.problems)} objects could not be copied; their jobs still point to the images folder")
        if settings.storage.backend != "s3":
            print('next: set [storage] backend = "s3" (until then new images go to the images folder; '
                  "run this again after switching to move them too)")
    return EXIT_FAILED if report.problems else EXIT_OK


def _show(columns: list[str], rows: list[list[str]]) -> None:
    """Rows as a table on a terminal, as tab-separated lines when piped; nothing when empty.
    Every cell is _printable text, never markup."""
    from .cli import _console, _is_terminal, _printable

    if not rows:
        return
    if not _is_terminal(sys.stdout):
        for row in rows:
            print("\t".join(_printable(cell) for cell in row))
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(header_style="bold")
    for name in columns:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*(Text(_printable(cell)) for cell in row))
    _console(sys.stdout).print(table)
