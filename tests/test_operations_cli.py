"""Operating easel: `easel doctor`, rich output on a terminal (plain when piped), `easel budget
report`, and the deploy files (systemd unit, Dockerfile, compose file, Grafana dashboard).

The CLI runs as a subprocess in its own workspace, as in test_cli.py. EASEL_FORCE_TERMINAL=1
makes it treat a pipe as a terminal, so the rich output can be checked. No test here generates
an image: `easel doctor` must not, and jobs and spending are written to the database directly."""
from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.test_cli import EASEL, Workspace, _env, make_workspace

ROOT = Path(__file__).resolve().parent.parent
SECRETS = ("OPENAI_API_KEY", "REPLICATE_API_TOKEN", "TOGETHER_API_KEY", "GOOGLE_API_KEY", "GEMINI_API_KEY",
           "FIREWORKS_API_KEY", "DISCORD_TOKEN", "GOOGLE_CLOUD_PROJECT", "GOOGLE_GENAI_USE_VERTEXAI")
ANSI = "\x1b["
BOX = re.compile("[\u2500-\u257f]")  # box-drawing characters: rich's table borders
SGR = re.compile(r"\x1b\[[0-9;]*m")  # rich's colours and styles
METRICS = {  # the names the metrics module exports (prometheus-client), with their kind
    "easel_jobs_total": "counter", "easel_generation_seconds": "histogram",
    "easel_job_seconds": "histogram", "easel_discord_ack_seconds": "histogram",
    "easel_queue_depth": "gauge", "easel_running_jobs": "gauge", "easel_spend_usd_total": "counter",
    "easel_provider_errors_total": "counter", "easel_circuit_open": "gauge",
    "easel_moderation_blocks_total": "counter", "easel_image_screen_seconds": "histogram",
}


def env(*, terminal: bool = False, **extra: str) -> dict[str, str]:
    """The test environment without any real key or token, and as wide as a table needs."""
    out = {k: v for k, v in _env(**extra).items() if k not in SECRETS or k in extra}
    out.pop("EASEL_FORCE_TERMINAL", None)
    out.update(COLUMNS="200")
    if terminal:
        out["EASEL_FORCE_TERMINAL"] = "1"
    return out


def run(ws: Workspace, *args: str, terminal: bool = False, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(ws.args(*args), cwd=ws.root, env=env(terminal=terminal, **extra),
                          capture_output=True, text=True, timeout=120)


def lines_of(result: subprocess.CompletedProcess) -> dict[str, str]:
    """doctor's plain lines by check name: "ok   database: ..." -> {"database": "ok   database: ..."}"""
    out = {}
    for line in result.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("ok", "FAIL", "skip"):
            out[rest.strip().split(":")[0]] = line
    return out


# ---- easel doctor --------------------------------------------------------------------------

def _healthy(port: int) -> bool:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture
def served(tmp_path):
    """A workspace whose image server (`easel serve`) is up on its port."""
    ws = make_workspace(tmp_path / "ws", image_classifier="nudenet")
    server = subprocess.Popen(ws.args("serve"), cwd=ws.root, env=env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not _healthy(ws.port):
            assert server.poll() is None, server.communicate()
            assert time.monotonic() < deadline, "easel serve did not start"
            time.sleep(0.1)
        yield ws
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()


def test_doctor_passes_on_a_good_setup(served):
    token = "discord-token-must-stay-secret"
    result = run(served, "doctor", DISCORD_TOKEN=token)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = lines_of(result)
    for name in ("settings", "images folder", "database", "generator local", "default model",
                 "image screen", "discord token", "public URL"):
        assert checks[name].startswith("ok "), checks[name]
    assert all(line.startswith(("ok ", "skip ")) for line in checks.values()), result.stdout
    assert "FAIL" not in result.stdout
    assert result.stdout.splitlines()[-1].startswith("doctor: all ")
    assert f"http://127.0.0.1:{served.port}/healthz answered 200" in checks["public URL"]
    assert "schema version" in checks["database"]
    assert checks["discord token"] == "ok   discord token: set ($DISCORD_TOKEN)"
    assert token not in result.stdout + result.stderr
    assert ANSI not in result.stdout and not BOX.search(result.stdout)
    # doctor generates nothing: no model was built, no job recorded.
    assert not (served.data / "models").exists()
    assert json.loads(run(served, "jobs", "--json").stdout) == []

    shown = run(served, "doctor", terminal=True, DISCORD_TOKEN=token)
    assert shown.returncode == 0, shown.stdout
    assert "✓" in shown.stdout and "✗" not in shown.stdout and ANSI in shown.stdout
    assert token not in shown.stdout + shown.stderr


def test_doctor_names_each_problem_and_its_fix(tmp_path):
    ws = make_workspace(tmp_path / "ws", **{"generators.openai": {"enabled": True}})
    (ws.data / "easel.db").mkdir(parents=True)  # a directory where the database should be
    secret = "sk-secret-123"  # a key of another provider, which is set up: never shown
    result = run(ws, "doctor", REPLICATE_API_TOKEN=secret)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    checks = lines_of(result)

    assert checks["images folder"].startswith("ok ")
    database = checks["database"]
    assert database.startswith("FAIL database: storage.database") and "is a directory" in database
    assert "; fix: point storage.database at" in database

    url = checks["public URL"]
    assert url.startswith(f"FAIL public URL: http://127.0.0.1:{ws.port}/healthz is unreachable")
    assert url.endswith("; fix: start `easel serve` or `easel run`, or fix storage.public_url")

    openai = checks["generator openai"]
    assert openai.startswith("FAIL") and "$OPENAI_API_KEY is not set" in openai
    assert "; fix: put OPENAI_API_KEY=<key> in the environment" in openai

    assert checks["discord token"].startswith("FAIL discord token: not set ($DISCORD_TOKEN); fix: ")
    assert checks["generator replicate"].startswith("ok ") and "key set ($REPLICATE_API_TOKEN)" in checks["generator replicate"]
    assert checks["generator together"].startswith("skip ")  # not set up, and not needed

    failed = [line for line in checks.values() if line.startswith("FAIL")]
    assert len(failed) == 4 and all("; fix: " in line for line in failed)
    assert result.stdout.splitlines()[-1] == (
        "doctor: 4 of 16 checks failed: database, generator openai, discord token, public URL")
    assert secret not in result.stdout + result.stderr

    shown = run(ws, "doctor", terminal=True, REPLICATE_API_TOKEN=secret)
    assert shown.returncode == 1
    assert shown.stdout.count("✗") == 4 and "✓" in shown.stdout
    assert secret not in shown.stdout + shown.stderr


def test_doctor_checks_the_images_folder_and_the_default_model(tmp_path):
    ws = make_workspace(tmp_path / "ws", generation={"default_model": "nope"})
    ws.data.mkdir(parents=True)
    (ws.data / "images").write_text("a file where the images folder should be")
    result = run(ws, "doctor")
    assert result.returncode == 1
    checks = lines_of(result)
    assert checks["images folder"].startswith("FAIL images folder: storage.images_dir")
    assert "the images folder is a file" in checks["images folder"]
    assert checks["database"].startswith("ok ")  # checked on its own all the same
    assert checks["default model"].startswith("FAIL default model: 'nope' is not a usable model")
    assert "; fix: set generation.default_model to a usable model (tiny)" in checks["default model"]


# ---- rich output on a terminal, plain when piped ---------------------------------------------

def _database(ws: Workspace) -> sqlite3.Connection:
    assert run(ws, "jobs").returncode == 0  # makes the database
    return sqlite3.connect(ws.data / "easel.db")


@pytest.fixture
def with_jobs(tmp_path) -> Workspace:
    ws = make_workspace(tmp_path / "ws")
    now = time.time()
    with _database(ws) as conn:
        conn.execute("INSERT INTO jobs (kind, status, user_id, model, provider, seed, cost_micros, prompt,"
                     " sha256, image_url, created_at) VALUES ('imagine', 'done', 'ann', 'tiny', 'local', 42,"
                     " 12500, 'a lighthouse at dusk', ?, 'http://127.0.0.1/images/ab.png', ?)", ("ab" * 32, now))
        conn.execute("INSERT INTO jobs (kind, status, user_id, model, error, created_at) VALUES"
                     " ('imagine', 'failed', 'old\x1b[2Juser', 'm\x1b]0;x\x07', 'upstream said \x1b[31mno', ?)",
                     (now,))
        for job_id, user, provider, micros in [(1, "ann", "local", 12_500), (3, "bob", "openai", 40_000),
                                               (4, "ann", "openai", 40_000)]:
            conn.execute("INSERT INTO reservations (job_id, user_id, provider, paid, amount_micros, state,"
                         " charged_micros, created_at, closed_at) VALUES (?, ?, ?, 1, ?, 'settled', ?, ?, ?)",
                         (job_id, user, provider, micros, micros, now, now))
    return ws


def test_jobs_is_a_table_on_a_terminal(with_jobs):
    result = run(with_jobs, "jobs", terminal=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert BOX.search(out), out
    text = SGR.sub("", out)
    header = next(line for line in text.splitlines() if "status" in line)
    assert re.findall(r"\w+", header) == ["id", "status", "kind", "user", "model", "seed", "cost", "prompt", "detail"]
    # The URL shown is made afresh from the store (a bucket's presigned URLs expire), not the stored one.
    assert "a lighthouse at dusk" in text and "$0.0125" in text and "http://127.0.0.1/images/ab.png" not in text
    assert re.sub(r"\s|│", "", text).count("ab" * 32 + ".png") == 1
    # Stored escape sequences reach the terminal as text, not as commands.
    assert "\x1b[2J" not in out and "\x1b]" not in out and "\x07" not in out
    assert "old\\x1b[2Juser" in text and "upstream said \\x1b[31mno" in text


def test_jobs_piped_is_the_plain_listing(with_jobs):
    result = run(with_jobs, "jobs")
    assert result.returncode == 0, result.stderr
    assert ANSI not in result.stdout and "\x1b" not in result.stdout and not BOX.search(result.stdout)
    assert [line.split()[:3] for line in result.stdout.splitlines()] == [
        ["2", "failed", "imagine"], ["1", "done", "imagine"]]
    assert "seed 42" in result.stdout and "'a lighthouse at dusk'" in result.stdout


def test_budget_report_plain_table_and_json(with_jobs):
    plain = run(with_jobs, "budget", "report")
    assert plain.returncode == 0, plain.stderr
    assert ANSI not in plain.stdout and not BOX.search(plain.stdout)
    lines = plain.stdout.splitlines()
    assert lines[0].startswith("period month since ") and lines[0].endswith(": total $0.0925")
    rows = [line.split() for line in lines[1:]]
    assert [r for r in rows if r[0] in ("user", "provider")] == [
        ["user", "ann", "$0.0525"], ["user", "bob", "$0.0400"],
        ["provider", "openai", "$0.0800"], ["provider", "local", "$0.0125"]]
    assert sum(float(r[2][1:]) for r in rows if r[0] == "day") == pytest.approx(0.0925)
    assert {r[0] for r in rows} >= {"user", "guild", "provider", "model", "day"}

    table = run(with_jobs, "budget", "report", "--period", "week", terminal=True)
    assert table.returncode == 0, table.stderr
    assert BOX.search(table.stdout)
    text = SGR.sub("", table.stdout)
    assert "by user" in text and "by provider" in text and "by model" in text and "week" in text
    assert re.search(r"ann\s*│\s*\$0\.0525", text) and re.search(r"openai\s*│\s*\$0\.0800", text)

    as_json = run(with_jobs, "budget", "report", "--period", "day", "--json", terminal=True)
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)  # plain JSON even on a terminal
    assert report["period"] == "day" and report["total_usd"] == pytest.approx(0.0925)
    assert [(t["key"], t["spent_micros"]) for t in report["by"]["user"]] == [("ann", 52_500), ("bob", 40_000)]
    assert {p["key"]: p["spent_usd"] for p in report["by"]["provider"]} == {"openai": 0.08, "local": 0.0125}
    assert report["guild_cap_usd"] is None


@pytest.mark.parametrize("args, message", [
    (["budget", "report", "ann"], "unrecognized arguments: ann"),
    (["budget", "show"], "the following arguments are required: user"),
    (["budget", "grant"], "the following arguments are required: user, amount"),
    (["budget", "show", "ann", "--period", "day"], "unrecognized arguments: --period day"),
    (["budget", "allowance", "set", "lots"], "'lots' is not an amount in USD like 2.50"),
    (["budget", "exempt"], "one of the arguments --role --user is required"),
    (["budget", "report", "--period", "year"], "invalid choice: 'year'"),
])
def test_budget_usage_errors_are_one_line(workspace_for_errors, args, message):
    result = run(workspace_for_errors, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def workspace_for_errors(tmp_path_factory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("errors") / "ws")


def _events(*events):
    return [SimpleNamespace(job_id=1, state=s, position=p, fraction=f, preview=None) for s, p, f in events]


EVENTS = _events(("queued", 2, None), ("queued", 1, None), ("running", None, None),
                 ("progress", None, 0.5), ("progress", None, 1.0))


def test_progress_piped_prints_what_it_always_did(monkeypatch):
    from bot.cli import ProgressBar

    monkeypatch.delenv("EASEL_FORCE_TERMINAL", raising=False)
    stream = io.StringIO()
    bar = ProgressBar(stream)
    for event in EVENTS:
        bar.update(event)
    bar.close()
    assert stream.getvalue() == (
        "queued, position 2\nqueued, position 1\nrunning\n[##############################] 100%\n")


def test_progress_on_a_terminal_is_a_rich_bar(monkeypatch):
    from bot.cli import ProgressBar

    monkeypatch.setenv("EASEL_FORCE_TERMINAL", "1")
    stream = io.StringIO()
    bar = ProgressBar(stream, loads_model=True)
    for event in EVENTS:
        bar.update(event)
    bar.close()
    out = stream.getvalue()
    assert ANSI in out
    for text in ("starting", "queued, position 2", "loading model…", "generating"):
        assert text in out, out


def test_rich_is_not_imported_for_help(tmp_path):
    code = ("import json, sys\n"
            "import bot.cli\n"
            "parser = bot.cli.build_parser()\n"
            "parser.parse_args(['doctor'])\n"
            "parser.parse_args(['budget', 'report', '--period', 'week', '--json'])\n"
            "print(json.dumps([m for m in ('rich', 'torch', 'PIL', 'aiohttp') if m in sys.modules]))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


# ---- deploy files --------------------------------------------------------------------------

def _help_commands() -> set[str]:
    result = subprocess.run([*EASEL, "--help"], env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    listing = result.stdout.split("COMMAND\n", 1)[1].split("\n\n", 1)[0]  # under "positional arguments"
    return set(re.findall(r"^ {4}([a-z]+)\b", listing, flags=re.M))


def test_doctor_is_a_command():
    assert {"doctor", "run", "serve", "jobs", "budget"} <= _help_commands()


SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if Path("/usr/bin/systemd-analyze").exists() else None)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_verifies(tmp_path):
    unit = (ROOT / "deploy" / "easel.service").read_text()
    for line in ("Type=simple", "User=easel", "StateDirectory=easel", "WorkingDirectory=/var/lib/easel",
                 "EnvironmentFile=-/etc/easel/env", "Restart=on-failure", "RestartSec=5",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/easel",
                 "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in unit.splitlines(), line
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    binary, *args = exec_start.removeprefix("ExecStart=").split()
    assert Path(binary).name == "easel" and args == ["run"]
    # `verify` checks that ExecStart's program exists and is executable, and easel is not
    # installed at /opt/easel on this machine: verify a copy that points at this checkout's
    # easel instead (the user `easel` need not exist: verify does not resolve users). Anything
    # else it says (an unknown key or section, a bad value) fails the test, even as a warning.
    here = Path(EASEL[0]) if Path(EASEL[0]).name == "easel" else Path(sys.executable)
    copy = tmp_path / "easel.service"
    copy.write_text(unit.replace(exec_start, f"ExecStart={here} run"))
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True,
                            timeout=60, env={**env(), "SYSTEMD_LOG_LEVEL": "warning"})
    said = [line for line in (result.stdout + result.stderr).splitlines()
            if str(copy) in line or copy.name in line]
    assert result.returncode == 0, result.stdout + result.stderr
    assert said == [], said


def test_the_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    # Its instructions, continuation lines joined, comments left out.
    lines = [line.strip() for line in re.sub(r"\\\n\s*", " ", text).splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    torch = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line)
    assert lines[torch].startswith("RUN pip install") and "download.pytorch.org/whl/cpu" in lines[torch]
    extras = next(i for i, line in enumerate(lines) if '".[local,nsfw,cloud,discord]"' in line)
    assert torch < extras  # the pinned CPU torch is there before the extras could pull another
    users = [line.split(None, 1)[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert any(line.startswith("RUN useradd") and users[-1] in line for line in lines)
    assert lines.index(f"USER {users[-1]}") < lines.index(next(x for x in lines if x.startswith("CMD ")))
    assert 'VOLUME ["/data"]' in lines
    (health,) = [line for line in lines if line.startswith("HEALTHCHECK ")]
    assert not any(tool in line for line in lines for tool in ("curl", "wget"))  # none in the slim image
    health_cmd = json.loads(health.split(" CMD ", 1)[1])
    assert health_cmd[0] == "python" and "/healthz" in health_cmd[-1]
    compile(health_cmd[-1], "<healthcheck>", "exec")  # the check is valid Python
    (cmd,) = [json.loads(line.removeprefix("CMD").strip()) for line in lines if line.startswith("CMD ")]
    assert cmd[0] == "easel" and cmd[1] in _help_commands()
    # The server port the image exposes is the default one (ServerSettings).
    from bot.config import ServerSettings
    assert f"EXPOSE {ServerSettings().port}" in lines
    # Every folder the image copies exists in this checkout.
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_the_compose_file():
    text = (ROOT / "compose.yaml").read_text()
    if importlib.util.find_spec("yaml") is None:  # PyYAML is no dependency: check key lines
        for line in ("services:", "  easel:", "    build: .", "  minio:", '    profiles: ["minio"]',
                     '    profiles: ["ray"]', "      - easel-data:/data"):
            assert line in text.splitlines(), line
        return
    import yaml

    compose = yaml.safe_load(text)
    services = compose["services"]
    easel = services["easel"]
    assert easel["build"] == "." and easel["command"][0] == "easel" and easel["command"][1] in _help_commands()
    assert "profiles" not in easel  # started by a plain `docker compose up`
    assert easel["env_file"] and any(v.endswith(":/data") for v in easel["volumes"])
    assert "8080:8080" in easel["ports"]
    assert services["minio"]["profiles"] == ["minio"] and services["minio"]["image"].startswith("minio/minio")
    assert any("mc mb" in " ".join(s.get("command", [])) for s in services.values()
               if s.get("profiles") == ["minio"] and s is not services["minio"])  # the bucket
    (ray,) = [s for s in services.values() if s.get("profiles") == ["ray"]]
    assert ray["image"].startswith("rayproject/ray") and "--head" in ray["command"]
    for volume in ("easel-data", "minio-data"):
        assert volume in compose["volumes"]


def test_the_grafana_dashboard_uses_only_easels_metrics():
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [json.dumps(v.get("query", "")) for v in variables.values() if v["type"] == "query"]
    assert len(dashboard["panels"]) >= 10 and all(exprs)
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    used = set()
    for expr in exprs:
        assert expr.count("(") == expr.count(")"), expr
        for name in re.findall(r"\beasel_[a-z0-9_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in METRICS, name
            if base != name:  # _bucket, _sum and _count exist only for histograms
                assert METRICS[base] == "histogram", name
            if "histogram_quantile" in expr and METRICS[base] == "histogram":
                assert name.endswith("_bucket"), expr
            used.add(base)
    assert used == set(METRICS)  # every metric has a panel
    # rate() and increase() only over counters and histogram series, never over a gauge.
    for expr in exprs:
        for name in re.findall(r"(?:rate|increase)\((easel_[a-z0-9_]+)", expr):
            assert METRICS[re.sub(r"_(bucket|sum|count)$", "", name)] in ("counter", "histogram"), expr
