"""Crash recovery through the real command line: a job killed mid-flight (kill -9) is failed and
refunded by the next command that opens the database, whatever that command is; a job whose
owner's process id now belongs to another live process is recovered too; SIGTERM refunds a job
like Ctrl-C. The slow job is a GPT Image call to the fake OpenAI that takes a minute to answer."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from tests.fakes.providers import FakeOpenAI
from tests.helpers import write_workspace_config

EASEL = [sys.executable, "-m", "bot.cli"]


@pytest.fixture
async def slow_openai():
    async with FakeOpenAI() as fake:
        fake.latency_s = 60.0
        yield fake


def _workspace(root: Path, fake: FakeOpenAI, **sections) -> tuple[Path, dict[str, str]]:
    write_workspace_config(root, **{
        "generation": {"default_model": "gpt-image-1"},
        "generators.local": {"enabled": False},
        "generators.openai": {"timeout_s": 120},
        **sections,
    })
    env = {k: v for k, v in os.environ.items() if k != "EASEL_CONFIG"}
    env.update(OPENAI_API_KEY=fake.api_key, OPENAI_BASE_URL=f"{fake.base_url}/v1", PYTHONUNBUFFERED="1")
    return root / "easel.toml", env


async def _easel(config: Path, env: dict, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*EASEL, "--config", str(config), *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


def _held(db: Path) -> list[tuple]:
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute(
                "SELECT job_id, user_id, amount_micros FROM reservations WHERE state = 'held'").fetchall()
    except sqlite3.OperationalError:  # the database is still being made
        return []


async def _start_slow_job(config: Path, env: dict, db: Path, fake: FakeOpenAI):
    proc = await asyncio.create_subprocess_exec(
        *EASEL, "--config", str(config), "imagine", "a lighthouse", "--json", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (db.exists() and _held(db) and fake.calls("POST", "/v1/images")):
        assert time.monotonic() < deadline, "the job never reached the provider"
        assert proc.returncode is None, await proc.stderr.read()
        await asyncio.sleep(0.1)
    return proc


async def test_a_job_killed_mid_flight_is_refunded_by_the_next_command(tmp_path, slow_openai):
    config, env = _workspace(tmp_path, slow_openai)
    db = tmp_path / "data" / "easel.db"
    proc = await _start_slow_job(config, env, db, slow_openai)
    [(job_id, user, held)] = _held(db)
    assert held > 0
    proc.kill()  # SIGKILL: no clean-up of its own
    await proc.wait()

    code, out, _ = await _easel(config, env, "budget", "show", user)  # not a job command
    assert code == 0 and "held for running jobs $0.0000" in out, out
    assert _held(db) == []
    code, out, _ = await _easel(config, env, "jobs", "--json")
    [job] = json.loads(out)
    assert (job["id"], job["status"], job["error_code"]) == (job_id, "failed", "interrupted")
    assert job["cost_micros"] == 0


async def test_sigterm_cancels_a_cli_job_and_refunds_it(tmp_path, slow_openai):
    config, env = _workspace(tmp_path, slow_openai)
    db = tmp_path / "data" / "easel.db"
    proc = await _start_slow_job(config, env, db, slow_openai)
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 143 and "refunded" in err.decode()
    assert _held(db) == []  # refunded by the job's own process, before any other command ran
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status, cost_micros FROM jobs").fetchall() == [("cancelled", 0)]


async def test_a_job_whose_owner_pid_was_reused_is_recovered(tmp_path, slow_openai):
    """The owner's pid is alive (it is this test's own process) but started at another time:
    the process that owned the job is gone, and its money is given back."""
    config, env = _workspace(tmp_path, slow_openai)
    db = tmp_path / "data" / "easel.db"
    code, _, err = await _easel(config, env, "budget", "show", "alice")  # creates the database
    assert code == 0, err
    now = time.time()
    owner = f"{socket.gethostname()}:{os.getpid()}:1"
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO jobs (id, kind, status, user_id, owner, created_at, started_at)"
                     " VALUES (7, 'imagine', 'running', 'alice', ?, ?, ?)", (owner, now, now))
        conn.execute("UPDATE accounts SET balance_micros = 5000000, reserved_micros = 40000 WHERE user_id = 'alice'")
        conn.execute("INSERT INTO reservations (job_id, user_id, amount_micros, state, created_at)"
                     " VALUES (7, 'alice', 40000, 'held', ?)", (now,))
    code, out, _ = await _easel(config, env, "budget", "show", "alice")
    assert code == 0 and "balance $5.0000, held for running jobs $0.0000, available $5.0000" in out, out
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status, error_code FROM jobs WHERE id = 7").fetchone() == (
            "failed", "interrupted")


async def test_the_per_user_limit_holds_across_processes(tmp_path, slow_openai):
    """One CLI process has a job in flight; another process may not start a second for the same
    user beyond queue.max_jobs_per_user = 1 (the database keeps the count)."""
    config, env = _workspace(tmp_path, slow_openai, queue={"max_jobs_per_user": 1})
    db = tmp_path / "data" / "easel.db"
    proc = await _start_slow_job(config, env, db, slow_openai)
    try:
        code, _, err = await _easel(config, env, "imagine", "a second lighthouse")
        assert code == 4 and "you already have 1 request in flight (the limit is 1)" in err, err
        assert len(_held(db)) == 1  # the refused job held nothing
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT status, error_code FROM jobs ORDER BY id").fetchall() == [
                ("running", None), ("refused", "busy")]
    finally:
        proc.kill()
        await proc.wait()
