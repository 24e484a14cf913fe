"""A PNG chart of daily spend against the caps, for `easel budget report --chart` and
/budget report (matplotlib, imported only here, drawn off screen; blocking: call it in a thread)."""
from __future__ import annotations

import io
import time

from .core.budgets import SpendReport
from .core.models import MICROS_PER_USD
from .core.money import Money


def spend_chart(report: SpendReport, money: Money, *, width_px: int = 900, height_px: int = 420) -> bytes:
    """Bars of each day's spend since the period began, a line at the daily cap, and the
    period's running total against the guild cap when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    scale = money.credit_micros or MICROS_PER_USD
    unit = "credits" if money.credit_micros else "USD"
    days = _days(report)
    spent = [report.by["day"].get(d, 0) / scale for d in days]
    fig = Figure(figsize=(width_px / 100, height_px / 100), dpi=100)
    ax = fig.add_subplot()
    ax.bar(range(len(days)), spent, color="#5865f2", label="spent per day")
    if report.daily_cap_micros:
        ax.axhline(report.daily_cap_micros / scale, color="#ed4245", linestyle="--", label="daily cap (paid)")
    if report.guild_cap_micros:
        total, running = 0.0, []
        for value in spent:
            total += value
            running.append(total)
        ax.plot(range(len(days)), running, color="#57f287", marker="o", label="spent this period")
        ax.axhline(report.guild_cap_micros / scale, color="#fee75c", linestyle=":", label="server cap per period")
    ax.set_xticks(range(len(days)), [d[5:] for d in days], rotation=45 if len(days) > 10 else 0, fontsize=8)
    ax.set_ylabel(unit)
    ax.set_title(f"Spend this {report.period}: {money.text(report.total_micros)}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def _days(report: SpendReport) -> list[str]:
    """Every day from the period's start to the last day with spend (or today)."""
    last = max(report.by["day"], default=time.strftime("%Y-%m-%d", time.gmtime()))
    days, t = [], report.since
    while True:
        day = time.strftime("%Y-%m-%d", time.gmtime(t))
        days.append(day)
        if day >= last or len(days) > 62:
            return days
        t += 86400
