"""`easel budget ...`: members' balances, allowances per period (default, role, member), grants,
blocks, exemptions, history and spend reports. Each action calls one method of the core's
Budgets (the same ones /budget calls on Discord); `--json` prints one JSON object."""
from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime

from . import cli as base

ACTIONS = ("show", "set", "grant", "reset", "allowance", "block", "unblock", "exempt", "history", "report",
           "guild-cap")


def add_parser(sub) -> None:
    p = sub.add_parser("budget", help="balances, allowances, grants, blocks, exemptions, history, spend reports")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help: str, *, user: bool = True):
        a = actions.add_parser(name, help=help)
        if user:
            a.add_argument("user", type=base._user, help="the member (a Discord user id, or a CLI user)")
        a.add_argument("--json", action="store_true", help="print one JSON object")
        return a

    a = action("show", "a member's balance, allowance, spend this period and state")
    a.add_argument("--role", action="append", default=[], help="a role of theirs (repeatable)")
    action("set", "set a member's balance").add_argument("amount", type=base._usd, help="the new balance")
    a = action("grant", "credit on top of the allowance, which never lapses (negative: take away)")
    a.add_argument("amount", type=base._usd)
    a.add_argument("--reason", help="why, for the history")
    action("reset", "the member's allowance back to a full period's (credit is kept)")
    allowance = actions.add_parser("allowance", help="allowances per period: show, or set for the default, a role or a member")
    which = allowance.add_subparsers(dest="allowance_action", required=True, metavar="show|set")
    show = which.add_parser("show", help="the default, the roles' and the members' allowances, and exemptions")
    show.add_argument("--json", action="store_true")
    setting = which.add_parser("set", help="set an allowance per period (no --role/--user: the default)")
    setting.add_argument("amount", type=_allowance_amount, help="the allowance per period, or 'none' to remove a role's or member's")
    target = setting.add_mutually_exclusive_group()
    target.add_argument("--role", help="a Discord role id")
    target.add_argument("--user", type=base._user, help="a member")
    setting.add_argument("--json", action="store_true")
    action("block", "refuse every request of a member").add_argument("--reason", help="shown to admins")
    action("unblock", "let a blocked member generate again")
    ex = action("exempt", "exempt a member or a role from limits (the daily cap still applies)", user=False)
    target = ex.add_mutually_exclusive_group(required=True)
    target.add_argument("--role", help="a Discord role id")
    target.add_argument("--user", type=base._user, help="a member")
    ex.add_argument("--off", action="store_true", help="take the exemption away")
    action("history", "a member's ledger entries, newest first").add_argument(
        "--limit", type=base._limit, default=20, help="how many (1-1000)")
    rep = action("report", "spend per user, role, guild, provider, model and day", user=False)
    rep.add_argument("--period", choices=["day", "week", "month"],
                     help="the period spending is counted over (default: budget.period)")
    rep.add_argument("--guild", help="only this guild's spend (and its cap)")
    rep.add_argument("--chart", metavar="FILE.png", help="also draw daily spend against the caps as a PNG")
    cap = action("guild-cap", "a guild's spending cap per period (0: none)", user=False)
    cap.add_argument("guild", help="the guild id")
    cap.add_argument("amount", type=base._usd)


def _allowance_amount(text: str) -> float | None:
    """An allowance: an amount, or "none" (a role's or member's removed)."""
    return None if text.strip().lower() == "none" else base._usd(text)


def run(settings, args) -> int:
    from .core.models import Refusal

    actor = f"cli:{os.environ.get('USER', '?')}"

    async def act():
        app = base._app(settings)
        try:
            return await _ACTIONS[args.action](app, args, actor)
        finally:
            await app.close()

    try:
        return asyncio.run(act())
    except Refusal as exc:
        return base._fail(str(exc), base.EXIT_USAGE)
    except ValueError as exc:
        return base._fail(str(exc), base.EXIT_USAGE)


def _emit(args, data: dict, lines: list[str]) -> int:
    if args.json:
        print(json.dumps(data))
    else:
        for line in lines:
            print(line)
    return base.EXIT_OK


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


async def _show(app, args, actor, did: str | None = None) -> int:
    b = await app.budgets.member(args.user, tuple(getattr(args, "role", []) or ()))
    money = app.budgets.money
    balance = b.balance
    data = {
        "user_id": b.user_id, "balance_micros": balance.balance_micros, "held_micros": balance.reserved_micros,
        "available_micros": balance.available_micros, "allowance_micros": b.allowance_micros, "period": b.period,
        "refills_at": b.refills_at, "spent_micros": b.spent_micros, "blocked": b.blocked is not None,
        "blocked_reason": b.blocked, "exempt": b.exempt, "did": did,
    }
    lines = [f"{base._printable(args.user)}: {did}"] if did else []
    lines.append(f"{base._printable(args.user)}: balance {money.text(balance.balance_micros)}, held for running "
                 f"jobs {money.text(balance.reserved_micros)}, available {money.text(balance.available_micros)}")
    lines.append(f"allowance {money.text(b.allowance_micros)} per {b.period}, refills {_when(b.refills_at)}; "
                 f"spent this {b.period} {money.text(b.spent_micros)}")
    if b.exempt:
        lines.append("exempt from limits")
    if b.blocked is not None:
        lines.append(f"BLOCKED{': ' + base._printable(b.blocked) if b.blocked else ''}")
    return _emit(args, data, lines)


async def _set(app, args, actor) -> int:
    done = await app.budgets.set_balance(args.user, app.budgets.money.to_micros(args.amount), actor)
    return await _show(app, args, actor, done.describe())


async def _grant(app, args, actor) -> int:
    done = await app.budgets.grant(args.user, app.budgets.money.to_micros(args.amount), actor, args.reason)
    return await _show(app, args, actor, done.describe())


async def _reset(app, args, actor) -> int:
    done = await app.budgets.reset(args.user, actor)
    return await _show(app, args, actor, done.describe())


async def _allowance(app, args, actor) -> int:
    budgets, money = app.budgets, app.budgets.money
    if args.allowance_action == "set":
        scope, subject = ("role", args.role) if args.role else ("user", args.user) if args.user else ("default", "")
        if args.amount is None:
            if scope == "default":
                return base._fail("the default allowance cannot be removed; set it to 0", base.EXIT_USAGE)
            amount = None
        else:
            amount = money.to_micros(args.amount)
        await budgets.set_allowance(scope, subject, amount, actor)
    a = await budgets.allowances()
    data = {
        "period": a.period, "default_micros": a.default_micros, "default_from_settings": a.from_settings,
        "carry_over_cap_micros": a.carry_over_cap_micros, "roles": a.roles, "users": a.users,
        "exempt_roles": a.exempt_roles, "exempt_users": a.exempt_users,
    }
    lines = [f"default {money.text(a.default_micros)} per {a.period}"
             f"{' (from the settings)' if a.from_settings else ''}; carries over up to "
             f"{money.text(a.carry_over_cap_micros)}"]
    lines += [f"role {base._printable(r)} {money.text(m)}" for r, m in a.roles.items()]
    lines += [f"user {base._printable(u)} {money.text(m)}" for u, m in a.users.items()]
    lines += [f"exempt role {base._printable(r)}" for r in a.exempt_roles]
    lines += [f"exempt user {base._printable(u)}" for u in a.exempt_users]
    return _emit(args, data, lines)


async def _block(app, args, actor) -> int:
    await app.budgets.block(args.user, args.reason, actor)
    return await _show(app, args, actor, "blocked: every request of theirs is refused")


async def _unblock(app, args, actor) -> int:
    was = await app.budgets.unblock(args.user, actor)
    return await _show(app, args, actor, "unblocked" if was else "was not blocked")


async def _exempt(app, args, actor) -> int:
    scope, subject = ("role", args.role) if args.role else ("user", args.user)
    await app.budgets.set_exempt(scope, subject, not args.off, actor)
    verb = "is no longer" if args.off else "is now"
    return _emit(args, {"scope": scope, "subject_id": subject, "exempt": not args.off},
                 [f"{scope} {base._printable(subject)} {verb} exempt from limits"])


async def _history(app, args, actor) -> int:
    entries = await app.budgets.history(args.user, args.limit)
    money = app.budgets.money
    data = {"user_id": args.user, "entries": [e.__dict__ for e in entries]}
    lines = [
        f"{_when(e.created_at)} {e.kind:<8} {money.text(e.amount_micros):>12} held {money.text(e.held_micros):>12}"
        f" balance {money.text(e.balance_after_micros):>12}"
        + (f" job {e.job_id}" if e.job_id else "")
        + (f" by {base._printable(e.actor)}" if e.actor else "")
        + (f" ({base._printable(e.reason)})" if e.reason else "")
        for e in entries
    ] or [f"{base._printable(args.user)}: no entries"]
    return _emit(args, data, lines)


async def _guild_cap(app, args, actor) -> int:
    cap = app.budgets.money.to_micros(args.amount)
    await app.budgets.set_guild_cap(args.guild, cap or None)
    return _emit(args, {"guild_id": args.guild, "cap_micros": cap or None},
                 [f"guild {base._printable(args.guild)}: cap {app.budgets.money.text(cap) if cap else 'none'} "
                  f"per {app.ledger.terms.period}"])


async def _report(app, args, actor) -> int:
    report = await app.budgets.report(args.guild, args.period)
    money = app.budgets.money
    if args.chart:
        from pathlib import Path

        from .charts import spend_chart

        png = await asyncio.to_thread(spend_chart, report, money)
        await asyncio.to_thread(Path(args.chart).write_bytes, png)
    since = datetime.fromtimestamp(report.since, UTC).isoformat(timespec="seconds")
    if args.json:
        print(json.dumps({
            "period": report.period, "since": since, "total_usd": report.total_micros / 1e6,
            "total_micros": report.total_micros,
            "by": {d: [{"key": k, "spent_micros": m, "spent_usd": m / 1e6} for k, m in rows.items()]
                   for d, rows in report.by.items()},
            "daily_cap_usd": report.daily_cap_micros / 1e6 or None,
            "guild_cap_usd": None if report.guild_cap_micros is None else report.guild_cap_micros / 1e6,
            "chart": args.chart,
        }))
        return base.EXIT_OK
    if not base._is_terminal(sys.stdout):
        print(f"period {report.period} since {since}: total {money.text(report.total_micros)}")
        for dimension, rows in report.by.items():
            for key, micros in rows.items():
                print(f"{dimension:<8} {base._printable(key):<24} {money.text(micros)}")
        return base.EXIT_OK
    _report_tables(report, money, since)
    return base.EXIT_OK


def _report_tables(report, money, since: str) -> None:
    from rich.table import Table
    from rich.text import Text

    console = base._console(sys.stdout)
    console.print(Text.assemble(("spending this ", ""), (report.period, "bold"), f" (since {since}): ",
                                (money.text(report.total_micros), "bold")))
    for dimension, rows in report.by.items():
        table = Table(title=f"by {dimension}", header_style="bold", title_justify="left")
        table.add_column(dimension)
        table.add_column("spent", justify="right")
        for name, micros in rows.items():
            table.add_row(Text(base._printable(name)), Text(money.text(micros)))
        if not rows:
            table.add_row(Text("nothing spent", style="dim"), Text(""))
        console.print(table)


_ACTIONS = {
    "show": _show, "set": _set, "grant": _grant, "reset": _reset, "allowance": _allowance, "block": _block,
    "unblock": _unblock, "exempt": _exempt, "history": _history, "report": _report, "guild-cap": _guild_cap,
}
