"""Bad input through the real command line, as a hostile new user would give it: every case ends
with the expected exit status and one clear line on stderr (argparse's own usage errors: its
usage line and then one), never a traceback, and nothing charged or stored.

Each case runs `easel` in a fresh workspace (its own settings, database and images); `setup`
may change that workspace first. The cases run two at a time (one per core)."""
from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import png_declaring, write_workspace_config

EASEL = [sys.executable, "-m", "bot.cli"]
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
OK, FAILED, USAGE = 0, 1, 2


@dataclass
class Case:
    name: str
    args: list  # str or bytes (undecodable argv)
    code: int
    message: str  # a fragment of the last stderr line (stdout for OK)
    setup: Callable[[Path], None] | None = None
    config: dict = field(default_factory=dict)  # tables to add to the workspace's settings
    skip: str | None = None


def _png(path: Path, size: tuple[int, int]) -> Path:
    from PIL import Image

    Image.new("RGB", size, (90, 30, 200)).save(path)
    return path


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda root: (root / name).write_bytes(data)


def _fifo(root: Path) -> None:
    os.mkfifo(root / "pipe.png")


def _sparse(name: str, size: int) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        with open(root / name, "wb") as f:
            f.truncate(size)
    return make


def _images_and_mask(root: Path) -> None:
    _png(root / "photo.png", (64, 64))
    _png(root / "mask.png", (32, 32))


def _newer_database(root: Path) -> None:
    (root / "data").mkdir(exist_ok=True)
    with sqlite3.connect(root / "data" / "easel.db") as conn:
        conn.execute("PRAGMA user_version = 999")


def _text_database(root: Path) -> None:
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "easel.db").write_text("this is not a database\n" * 100)


def _database_dir(root: Path) -> None:
    (root / "data" / "easel.db").mkdir(parents=True)


def _data_is_a_file(root: Path) -> None:
    (root / "data").write_text("a file where the data folder should be")


def _images_are_a_file(root: Path) -> None:
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "images").write_text("a file where the images folder should be")


def _read_only(folder: str) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder).chmod(0o500)
    return make


def _raw_config(text: bytes) -> Callable[[Path], None]:
    return lambda root: (root / "easel.toml").write_bytes(text)


_listener = socket.socket()
_listener.bind(("127.0.0.1", 0))
_listener.listen()
BUSY_PORT = _listener.getsockname()[1]

CASES = [
    # ---- prompts and parameters -----------------------------------------------------------
    Case("empty prompt", ["imagine", ""], USAGE, "the prompt is empty"),
    Case("only spaces", ["imagine", "   \t "], USAGE, "the prompt is empty"),
    Case("only zero-width characters", ["imagine", "\u200b\u200d\ufeff"], USAGE, "the prompt is empty"),
    Case("only control characters", ["imagine", "\x01\x02\x1b"], USAGE, "the prompt is empty"),
    Case("only flags", ["imagine", "--seed 4"], USAGE, "the prompt is empty"),
    Case("20k-character prompt", ["imagine", "a" * 20_000], USAGE, "the prompt is 20000 characters; the limit is 2000"),
    Case("20k-character negative", ["imagine", "a cat", "--negative", "b" * 20_000], USAGE,
         "the negative prompt is 20000 characters"),
    Case("undecodable argv", ["imagine", b"a \xff\xfe cat"], USAGE, "not valid text"),
    Case("unknown inline flag", ["imagine", "a cat --frobnicate 3"], USAGE, "frobnicate"),
    Case("negative seed", ["imagine", "a cat", "--seed", "-1"], USAGE, "--seed"),
    Case("seed past 2**32", ["imagine", "a cat", "--seed", str(2**32)], USAGE, "--seed"),
    Case("huge inline seed", ["imagine", "a cat --seed 99999999999999999999999"], USAGE, "seed"),
    Case("zero steps", ["imagine", "a cat", "--steps", "0"], USAGE, "steps"),
    Case("fractional steps", ["imagine", "a cat", "--steps", "2.5"], USAGE, "--steps"),
    Case("nan guidance", ["imagine", "a cat", "--guidance", "nan"], USAGE, "guidance must be a finite number"),
    Case("infinite guidance", ["imagine", "a cat", "--guidance", "inf"], USAGE, "guidance must be a finite number"),
    Case("zero size", ["imagine", "a cat", "--size", "0x0"], USAGE, "--size"),
    Case("enormous size", ["imagine", "a cat", "--size", "100000x100000"], USAGE, "--size"),
    Case("absurd aspect", ["imagine", "a cat --ar 100:1"], USAGE, "ratio"),
    Case("unknown model", ["imagine", "a cat", "--model", "no-such-model"], USAGE, "no-such-model"),
    Case("unknown sampler", ["imagine", "a cat", "--sampler", "bogus"], USAGE, "sampler"),
    Case("--enhance without an enhancer", ["imagine", "a cat --enhance"], USAGE, "prompt enhancement is not set up"),
    Case("--enhance with a value", ["imagine", "a cat --enhance lots"], USAGE, "--enhance takes no value"),
    Case("option the model lacks", ["imagine", "a cat", "--quality", "hd"], USAGE, "has no option 'quality'"),
    # ---- jobs ---------------------------------------------------------------------------------
    Case("missing job", ["variation", "999"], USAGE, "there is no job 999"),
    Case("job number past 2**63", ["variation", str(2**70)], USAGE, f"there is no job {2**70}"),
    Case("negative job number", ["upscale", "-5"], USAGE, "there is no job -5"),
    Case("job number zero", ["upscale", "0"], USAGE, "there is no job 0"),
    Case("zoom out of a missing job", ["zoom", "999"], USAGE, "there is no job 999"),
    Case("pan sideways", ["pan", "1", "sideways"], USAGE, "invalid choice"),
    Case("job number not a number", ["upscale", "seven"], USAGE, "invalid int value"),
    Case("huge jobs limit", ["jobs", "--limit", str(10**30)], USAGE, "must be 1-1000"),
    Case("negative jobs limit", ["jobs", "--limit", "-1"], USAGE, "must be 1-1000"),
    # ---- users and budgets --------------------------------------------------------------------
    Case("empty user", ["imagine", "a cat", "--user", ""], USAGE, "a user id must be 1-100 visible characters"),
    Case("endless user id", ["imagine", "a cat", "--user", "u" * 500], USAGE, "a user id must be 1-100"),
    Case("user id with an escape sequence", ["budget", "show", "\x1b[2Jmallory"], USAGE, "control characters"),
    Case("negative budget", ["budget", "set", "carol", "-5"], USAGE, "below zero"),
    Case("budget in words", ["budget", "set", "carol", "lots"], USAGE, "is not an amount in USD"),
    Case("astronomical grant", ["budget", "grant", "carol", "1e30"], USAGE, "out of range"),
    Case("nan grant", ["budget", "grant", "carol", "nan"], USAGE, "out of range"),
    Case("grant that would go negative", ["budget", "grant", "carol", "-999999"], OK,
         "took away $1.0000 of the $999999.0000 asked: only that much was available"),
    # ---- files ----------------------------------------------------------------------------------
    Case("edit /dev/zero", ["edit", "/dev/zero", "a red door"], USAGE, "not a regular file"),
    Case("edit a FIFO", ["edit", "pipe.png", "a red door"], USAGE, "not a regular file", setup=_fifo),
    Case("edit a directory", ["edit", ".", "a red door"], USAGE, "is a directory"),
    Case("edit a missing file", ["edit", "nowhere.png", "a red door"], USAGE, "nowhere.png: image not found"),
    Case("edit a 30 MiB file", ["edit", "big.png", "a red door"], USAGE, "the image is 30 MiB; the limit is 20 MiB",
         setup=_sparse("big.png", 30 * 2**20)),
    Case("edit an HTML page", ["edit", "page.png", "a red door"], USAGE, "the image was not accepted",
         setup=_write("page.png", b"<!doctype html><html><body>404</body></html>")),
    Case("edit a decompression bomb", ["edit", "bomb.png", "a red door"], USAGE, "the image was not accepted",
         setup=_write("bomb.png", png_declaring(60_000, 60_000))),
    Case("edit a truncated PNG", ["edit", "cut.png", "a red door"], USAGE, "the image was not accepted",
         setup=_write("cut.png", png_declaring(64, 64)[:40])),
    Case("mask of another size", ["edit", "photo.png", "a red door", "--mask", "mask.png"], USAGE, "must match",
         setup=_images_and_mask),
    # ---- settings --------------------------------------------------------------------------------
    Case("config is /dev/zero", ["--config", "/dev/zero", "jobs"], USAGE, "not a regular file"),
    Case("config missing", ["--config", "nowhere.toml", "jobs"], USAGE, "nowhere.toml: config file not found"),
    Case("config is a directory", ["--config", ".", "jobs"], USAGE, "is a directory"),
    Case("config of 2 MiB", ["jobs"], USAGE, "the limit is 1 MiB", setup=_sparse("easel.toml", 2 * 2**20)),
    Case("config not UTF-8", ["jobs"], USAGE, "not UTF-8", setup=_raw_config(b"[budget]\n# \xff\xfe\n")),
    Case("config unknown key", ["jobs"], USAGE, "did you mean", config={"budget": {"default_alowance_usd": 1.0}}),
    Case("allowance of 1e13", ["jobs"], USAGE, "default_allowance_usd", config={"budget": {"default_allowance_usd": 1e13}}),
    Case("empty prompt-rule term", ["jobs"], USAGE, "every term needs a letter or digit",
         config={"moderation.prompt_rules.bad": {"terms": ["nudity", ""]}}),
    Case("star prompt-rule term", ["jobs"], USAGE, "every term needs a letter or digit",
         config={"moderation.prompt_rules.bad": {"terms": ["*"]}}),
    # ---- storage ---------------------------------------------------------------------------------
    Case("database is a directory", ["budget", "show", "carol"], USAGE, "is a directory, not a database file",
         setup=_database_dir),
    Case("database is not SQLite", ["jobs"], USAGE, "not an easel database", setup=_text_database),
    Case("database from a newer easel", ["jobs"], USAGE, "newer than this easel knows", setup=_newer_database),
    Case("data folder is a file", ["jobs"], USAGE, "is a file", setup=_data_is_a_file),
    Case("images folder is a file", ["jobs"], USAGE, "the images folder is a file", setup=_images_are_a_file),
    Case("data folder read-only", ["jobs"], USAGE, "not writable", setup=_read_only("data"),
         skip="root writes anywhere" if ROOT else None),
    Case("images folder read-only", ["imagine", "a cat"], USAGE, "cannot write to the images folder",
         setup=_read_only("data/images"), skip="root writes anywhere" if ROOT else None),
    # ---- the image server and easel check ---------------------------------------------------------
    Case("port in use", ["serve"], USAGE, f"port {BUSY_PORT} is already in use",
         config={"server": {"port": BUSY_PORT}}),
    Case("unresolvable host", ["serve"], USAGE, "does not resolve", config={"server": {"host": "no-such-host.invalid"}}),
    Case("fallback to an unknown model", ["check"], FAILED, "fallback tiny -> nope: not usable: no model 'nope'",
         config={"routing.fallbacks": {"tiny": "nope"}}),
    Case("upscaler folder missing", ["check"], FAILED, "does not exist",
         config={"generators.local": {"upscaler": "./no-such-upscaler"}}),
    Case("unknown default model", ["check"], FAILED, "default model: not usable",
         config={"generation": {"default_model": "nope"}}),
]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def _run(case: Case, root: Path) -> Result:
    root.mkdir(parents=True)
    write_workspace_config(root, **case.config)
    if case.setup:
        case.setup(root)
    args = [os.fsencode(a) if isinstance(a, bytes) else a for a in case.args]
    if not any(isinstance(a, str) and a == "--config" for a in args):
        args = ["--config", str(root / "easel.toml"), *args]
    env = {k: v for k, v in os.environ.items() if k != "EASEL_CONFIG"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([*EASEL, *args], cwd=root, env=env, capture_output=True, timeout=120)
    return Result(done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace"))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[Result, Path]]:
    base = tmp_path_factory.mktemp("hostile")
    runnable = [c for c in CASES if not c.skip]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c.name: pool.submit(_run, c, base / f"case{i}") for i, c in enumerate(runnable)}
        out = {name: (f.result(), base / f"case{i}") for i, (name, f) in enumerate(futures.items())}
    _listener.close()
    return out


def _nothing_spent_or_stored(root: Path) -> None:
    images = root / "data" / "images"
    if images.is_dir():
        assert [p for p in images.rglob("*") if p.is_file() and not p.name.startswith(".")] == []
    db = root / "data" / "easel.db"
    if db.is_file():
        try:
            with sqlite3.connect(db) as conn:
                charges = conn.execute("SELECT COUNT(*) FROM ledger_entries WHERE kind IN ('charge', 'settle')").fetchone()[0]
                held = conn.execute("SELECT COUNT(*) FROM reservations WHERE state = 'held'").fetchone()[0]
                done = conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'done'").fetchone()[0]
                negative = conn.execute("SELECT COUNT(*) FROM accounts WHERE balance_micros < reserved_micros"
                                        ).fetchone()[0]
        except sqlite3.DatabaseError:
            return  # the cases whose database is the bad input
        assert (charges, held, done, negative) == (0, 0, 0, 0)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_clear_line_and_costs_nothing(case: Case, results):
    if case.skip:
        pytest.skip(case.skip)
    result, root = results[case.name]
    assert "Traceback" not in result.stderr, result.stderr
    assert result.code == case.code, (result.code, result.stdout, result.stderr)
    if case.code in (OK, FAILED):  # a report on stdout: the command did its work (easel check)
        assert case.message in result.stdout, result.stdout
    else:
        lines = result.stderr.strip().splitlines()
        usage_error = lines[0].startswith("usage: ") and ": error: " in lines[-1]  # argparse
        assert len(lines) == 1 or usage_error, lines
        assert lines[-1].startswith("easel"), lines
        assert case.message in lines[-1], lines[-1]
        assert "\x1b" not in result.stderr
    _nothing_spent_or_stored(root)


def test_the_table_is_broad():
    assert len(CASES) >= 60


def test_easel_jobs_shows_escape_sequences_from_stored_text_escaped(tmp_path):
    """A provider's error (or an old row's user id) with terminal escapes reaches the terminal
    as text, not as commands."""
    root = tmp_path / "ws"
    root.mkdir()
    write_workspace_config(root)
    env = {k: v for k, v in os.environ.items() if k != "EASEL_CONFIG"}
    run = [*EASEL, "--config", str(root / "easel.toml"), "jobs"]
    assert subprocess.run(run, cwd=root, env=env, capture_output=True).returncode == 0  # makes the database
    with sqlite3.connect(root / "data" / "easel.db") as conn:
        conn.execute("INSERT INTO jobs (kind, status, user_id, model, error, created_at) VALUES"
                     " ('imagine', 'failed', 'old\x1b[2Juser', 'm\x1b]0;x\x07', 'upstream said \x1b[31mno', 0)")
    done = subprocess.run(run, cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "\x1b" not in done.stdout and "\x07" not in done.stdout
    assert "old\\x1b[2Juser" in done.stdout and "upstream said \\x1b[31mno" in done.stdout
