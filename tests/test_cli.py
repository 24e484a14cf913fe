"""The `easel` command line, run as a subprocess against settings files in temporary folders.

The local `tiny` model is built once per session, by the first image, and copied into the data
folder of each workspace that needs it: every test has its own database and images, and none
rebuilds the model. The other commands that diffuse run in one fixture (`diffusions`), two at a
time."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import pixels, png_declaring, write_config, write_workspace_config

_SCRIPT = Path(sys.executable).with_name("easel")
EASEL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "bot.cli"]
PROMPT = "a lighthouse at dusk"
SMALL = ("--size", "64x64", "--steps", "2")
OUTCOME_KEYS = {"job_id", "status", "seed", "model", "provider", "width", "height", "cost_usd",
                "sha256", "image_path", "image_url", "error", "error_code", "retry_at"}
HEAVY_MODULES = ("torch", "diffusers", "transformers", "PIL")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "EASEL_CONFIG"}
    # One thread each: runs that go in parallel do not fight over the 2 cores, and every run
    # computes the same way (so equal seeds must give equal bytes).
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def easel(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EASEL, *args], cwd=cwd, env=env or _env(), capture_output=True,
                          text=True, timeout=120)


@dataclass
class Workspace:
    """A folder with its own settings file, database and images (paths relative to the file)."""

    root: Path
    port: int

    @property
    def config(self) -> Path:
        return self.root / "easel.toml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def args(self, *args: str) -> list[str]:
        return [*EASEL, "--config", str(self.config), *args]

    def run(self, *args: str, timeout: float = 180, **popen) -> subprocess.CompletedProcess:
        return subprocess.run(self.args(*args), cwd=self.root, env=_env(), capture_output=True,
                              text=True, timeout=timeout, **popen)

    def job(self, *args: str, expect: int = 0, timeout: float = 180) -> dict:
        return _outcome(self.run(*args, "--json", timeout=timeout), expect)

    def jobs(self, *args: str) -> list[dict]:
        result = self.run("jobs", "--json", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def balance_line(self, user: str) -> str:
        result = self.run("budget", "show", user)
        assert result.returncode == 0, result.stderr
        return result.stdout


def _outcome(result: subprocess.CompletedProcess, expect: int) -> dict:
    assert result.returncode == expect, (result.returncode, result.stdout, result.stderr[-3000:])
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # exactly one JSON object
    outcome = json.loads(lines[0])
    assert set(outcome) == OUTCOME_KEYS
    return outcome


def make_workspace(root: Path, *, image_classifier: str = "none", **sections) -> Workspace:
    return Workspace(root, write_workspace_config(root, image_classifier=image_classifier, **sections))


def _sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _check_image(outcome: dict, ws: Workspace, size: tuple[int, int]) -> Image.Image:
    assert outcome["status"] == "done", outcome
    assert outcome["error"] is None and outcome["error_code"] is None
    assert (outcome["width"], outcome["height"]) == size
    path = Path(outcome["image_path"])
    assert path.is_relative_to(ws.data / "images")
    assert _sha256_of(path) == outcome["sha256"]
    assert outcome["image_url"] == f"http://127.0.0.1:{ws.port}/images/{outcome['sha256']}.png"
    image = Image.open(path)
    assert image.size == size
    return image


def _noise(size: tuple[int, int]) -> Image.Image:
    return Image.frombytes("RGB", size, hashlib.shake_256(b"noise").digest(size[0] * size[1] * 3))


def _square_mask(size: tuple[int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    w, h = size
    mask.paste(255, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    return mask


@pytest.fixture(scope="session")
def first_image(tmp_path_factory) -> tuple[Workspace, dict]:
    """One image on the default image screen (nudenet); building the tiny model on the way."""
    ws = make_workspace(tmp_path_factory.mktemp("first"), image_classifier="nudenet")
    outcome = ws.job("imagine", PROMPT, "--seed", "42", *SMALL, timeout=600)
    return ws, outcome


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    """A fresh database and images folder, for commands that end before any diffusion."""
    return make_workspace(tmp_path / "ws")


@pytest.fixture
def seeded_workspace(tmp_path, first_image) -> Workspace:
    """A copy of the first image's database and images: job 1 is a done 64x64 image."""
    ws = make_workspace(tmp_path / "ws")
    shutil.copytree(first_image[0].data, ws.data)
    return ws


@dataclass
class Run:
    ws: Workspace
    result: subprocess.CompletedProcess

    def outcome(self, expect: int = 0) -> dict:
        return _outcome(self.result, expect)


EDIT_SIZE = (512, 512)  # the tiny model's own size: an edit of another size is resized to it


@pytest.fixture(scope="session")
def diffusions(first_image, tmp_path_factory) -> dict[str, Run]:
    """The other commands that diffuse, run two at a time (one per core): each costs seconds of
    CPU, mostly importing torch. The tests below each check one of them."""
    root = tmp_path_factory.mktemp("diffusions")
    models = first_image[0].data / "models"
    seeds, flags, edit, sampler = (make_workspace(root / name)
                                   for name in ("seeds", "flags", "edit", "sampler"))
    for ws in (seeds, flags, edit, sampler):
        shutil.copytree(models, ws.data / "models")
    derived = make_workspace(root / "derived")
    shutil.copytree(first_image[0].data, derived.data)
    source_job = str(first_image[1]["job_id"])
    _noise(EDIT_SIZE).save(root / "photo.png")
    _square_mask(EDIT_SIZE).save(root / "mask.png")
    runs: dict[str, Run] = {}

    def seed_lane() -> None:
        runs["chosen seed"] = Run(seeds, seeds.run("imagine", PROMPT, *SMALL, "--json"))
        try:
            seed = str(json.loads(runs["chosen seed"].result.stdout)["seed"])
        except (ValueError, KeyError, TypeError):
            return  # the test of the chosen seed says why
        runs["seed again"] = Run(seeds, seeds.run("imagine", PROMPT, "--seed", seed, *SMALL, "--json"))

    def other_lane() -> None:
        for name, ws, args in [
            ("inline flags", flags, ("imagine", "a cat --seed 7 --no blur --ar 2:1 --steps 1")),
            ("sampler", sampler, ("imagine", "a cat --sampler euler_a --seed 7", *SMALL)),
            ("sampler again", sampler, ("imagine", "a cat", "--sampler", "euler_a", "--seed", "7", *SMALL)),
            ("variation", derived, ("variation", source_job, "--seed", "5")),
            ("upscale", derived, ("upscale", source_job)),
            ("zoom", derived, ("zoom", source_job, "--seed", "3", "--steps", "2")),
            ("edit", edit, ("edit", str(root / "photo.png"), "a red door", "--mask",
                            str(root / "mask.png"), "--seed", "3", "--steps", "2")),
        ]:
            runs[name] = Run(ws, ws.run(*args, "--json"))

    with ThreadPoolExecutor(max_workers=2) as pool:
        for lane in [pool.submit(seed_lane), pool.submit(other_lane)]:
            lane.result()
    return runs


# ---- start-up ------------------------------------------------------------------------------

def test_help_is_quick(tmp_path):
    started = time.perf_counter()
    result = easel("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert time.perf_counter() - started < 5
    for command in ("imagine", "variation", "edit", "upscale", "jobs", "budget", "models", "check", "serve"):
        assert command in result.stdout


def test_the_parser_imports_no_heavy_module(tmp_path):
    code = (
        "import json, sys\n"
        "import bot.cli\n"
        "parser = bot.cli.build_parser()\n"
        "parser.parse_args(['imagine', 'a cat', '--size', '64x64', '--seed', '1'])\n"
        "parser.parse_args(['budget', 'grant', 'ann', '2.5'])\n"
        f"print(json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


# ---- settings ------------------------------------------------------------------------------

BAD_CONFIGS = {
    "unknown key": ("[server]\nprot = 8080\n", ["'server.prot'", "did you mean 'server.port'"]),
    "unknown table": ("[strage]\ndatabase = 'x.db'\n", ["'strage'", "did you mean 'storage'"]),
    "string for an integer": ('[server]\nport = "8080"\n', ["'server.port'", "integer"]),
    "boolean for an integer": ("[generation]\nmax_prompt_chars = true\n", ["'generation.max_prompt_chars'"]),
    "value for a table": ("storage = 5\n", ["'storage'", "table"]),
    "string for a list": ('[moderation.prompt_rules.gore]\nterms = "blood"\n',
                          ["'moderation.prompt_rules.gore.terms'", "a list of strings"]),
    "port 0": ("[server]\nport = 0\n", ["'server.port'", "1-65535"]),
    "unknown classifier": ('[moderation]\nimage_classifier = "clip"\n', ["'moderation.image_classifier'"]),
    "threshold above 1": ("[moderation]\nnsfw_threshold = 1.5\n", ["'moderation.nsfw_threshold'"]),
    "negative allowance": ("[budget]\ndefault_allowance_usd = -1\n", ["'budget.default_allowance_usd'"]),
    "infinite allowance": ("[budget]\ndefault_allowance_usd = inf\n", ["'budget.default_allowance_usd'"]),
    "infinite price": ("[generators.local]\nprice_per_second_usd = inf\n",
                       ["'generators.local.price_per_second_usd'"]),
    "invalid TOML": ("[storage\ndatabase = 'x.db'\n", ["not valid TOML", "line 1"]),
}


@pytest.mark.parametrize("text, fragments", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_a_bad_setting_is_one_line_naming_key_and_file(tmp_path, text, fragments):
    config = tmp_path / "bad.toml"
    config.write_text(text, encoding="utf-8")
    result = easel("--config", str(config), "budget", "show", "ann", cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("easel: ")
    assert str(config) in lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (tmp_path / "data").exists()  # nothing was created from bad settings


def test_a_missing_settings_file_is_named(tmp_path):
    result = easel("--config", "nowhere.toml", "budget", "show", "ann", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["easel: nowhere.toml: config file not found"]


def test_easel_config_variable_is_honoured_and_config_flag_wins(tmp_path):
    ws = make_workspace(tmp_path / "ws", budget={"default_allowance_usd": 7.25})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    result = easel("budget", "show", "ann", cwd=elsewhere, env=_env(EASEL_CONFIG=str(ws.config)))
    assert result.returncode == 0, result.stderr
    assert "balance $7.2500" in result.stdout

    missing = tmp_path / "missing.toml"
    result = easel("budget", "show", "ann", cwd=elsewhere, env=_env(EASEL_CONFIG=str(missing)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"easel: {missing}: config file not found"]

    result = easel("--config", str(ws.config), "budget", "show", "ann", cwd=elsewhere,
                   env=_env(EASEL_CONFIG=str(missing)))
    assert result.returncode == 0, result.stderr
    assert "balance $7.2500" in result.stdout


def test_relative_paths_resolve_against_the_settings_folder(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    write_config(conf / "easel.toml", {"storage": {"database": "db/easel.db", "images_dir": "img"}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    result = easel("--config", str(conf / "easel.toml"), "budget", "set", "ann", "3", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert (conf / "db" / "easel.db").is_file()
    assert list(elsewhere.iterdir()) == []

    # ./easel.toml is picked up without --config, and it is the same database.
    result = easel("budget", "show", "ann", cwd=conf)
    assert result.returncode == 0, result.stderr
    assert "balance $3.0000" in result.stdout


# ---- imagine -------------------------------------------------------------------------------

def test_imagine_end_to_end(first_image):
    ws, outcome = first_image
    _check_image(outcome, ws, (64, 64))
    assert (outcome["seed"], outcome["model"], outcome["provider"]) == (42, "tiny", "local")
    assert outcome["cost_usd"] > 0  # local time is priced
    balance_micros = 1_000_000 - round(outcome["cost_usd"] * 1_000_000)  # from the default $1
    assert f"balance ${balance_micros / 1e6:.4f}," in ws.balance_line("local")
    (job,) = ws.jobs()
    assert (job["id"], job["status"], job["sha256"], job["prompt"]) == (
        outcome["job_id"], "done", outcome["sha256"], PROMPT)


def test_a_chosen_seed_is_recorded(diffusions):
    run = diffusions["chosen seed"]
    chosen = run.outcome()
    _check_image(chosen, run.ws, (64, 64))
    seed = chosen["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    assert {j["id"]: j["seed"] for j in run.ws.jobs()}[chosen["job_id"]] == seed


def test_the_same_seed_gives_the_same_image(diffusions):
    chosen, again = diffusions["chosen seed"].outcome(), diffusions["seed again"].outcome()
    assert again["seed"] == chosen["seed"]
    assert again["job_id"] != chosen["job_id"]
    assert again["sha256"] != chosen["sha256"]  # the files carry their own job's provenance...
    assert pixels(again["image_path"]) == pixels(chosen["image_path"])  # ...the pixels are the same


def test_another_seed_gives_another_image(diffusions, first_image):
    chosen, seed_42 = diffusions["chosen seed"].outcome(), first_image[1]
    assert chosen["seed"] != 42
    assert pixels(chosen["image_path"]) != pixels(seed_42["image_path"])  # same prompt, size and steps


def test_inline_flags(diffusions):
    run = diffusions["inline flags"]
    outcome = run.outcome()
    _check_image(outcome, run.ws, (outcome["width"], outcome["height"]))
    assert outcome["seed"] == 7
    assert outcome["width"] == 2 * outcome["height"]
    (job,) = run.ws.jobs()
    assert (job["prompt"], job["negative_prompt"], job["steps"]) == ("a cat", "blur", 1)


def test_an_unknown_inline_flag_is_refused_without_a_job(workspace):
    result = workspace.run("imagine", "a cat --sed 7", *SMALL)
    assert result.returncode == 2
    assert "unknown flag --sed" in result.stderr
    assert "Traceback" not in result.stderr
    assert workspace.jobs() == []


def test_an_overlong_prompt_is_refused(workspace):
    result = workspace.run("imagine", "a" * 20_000, *SMALL)
    assert result.returncode == 2
    assert "20000 characters" in result.stderr and "2000" in result.stderr
    assert "Traceback" not in result.stderr
    assert workspace.jobs() == []


def test_a_blocked_prompt_charges_nothing(workspace):
    before = workspace.balance_line("local")
    outcome = workspace.job("imagine", "an nsfw poster", *SMALL, expect=3)
    assert (outcome["status"], outcome["error_code"], outcome["cost_usd"]) == ("blocked", "blocked", 0.0)
    assert outcome["sha256"] is None and outcome["image_path"] is None
    assert "explicit" in outcome["error"]
    assert workspace.balance_line("local") == before
    assert list((workspace.data / "images").rglob("*.png")) == []


def test_over_budget_is_refused_and_charges_nothing(workspace):
    set_result = workspace.run("budget", "set", "bob", "0")
    assert set_result.returncode == 0, set_result.stderr
    before = workspace.balance_line("bob")
    assert "balance $0.0000" in before
    outcome = workspace.job("imagine", PROMPT, "--user", "bob", *SMALL, expect=4)
    assert (outcome["status"], outcome["error_code"]) == ("refused", "over_budget")
    assert "over budget" in outcome["error"]
    assert workspace.balance_line("bob") == before


def test_budget_show_set_and_grant(workspace):
    def balance(result) -> str:
        assert result.returncode == 0, result.stderr
        return re.search(r"balance \$(\d+\.\d{4})", result.stdout).group(1)

    assert balance(workspace.run("budget", "show", "carol")) == "1.0000"  # the default allowance
    assert balance(workspace.run("budget", "set", "carol", "2.5")) == "2.5000"
    assert balance(workspace.run("budget", "grant", "carol", "$0.75")) == "3.2500"
    assert balance(workspace.run("budget", "show", "carol")) == "3.2500"
    assert balance(workspace.run("budget", "show", "dave")) == "1.0000"  # others untouched

    for action in ("set", "grant"):
        result = workspace.run("budget", action, "carol")
        assert result.returncode == 2
        assert "the following arguments are required: amount" in result.stderr
    result = workspace.run("budget", "set", "carol", "lots")
    assert result.returncode == 2
    assert balance(workspace.run("budget", "show", "carol")) == "3.2500"


# ---- variation, upscale, edit --------------------------------------------------------------

def test_variation_of_an_earlier_job(diffusions, first_image):
    source, run = first_image[1], diffusions["variation"]
    outcome = run.outcome()
    _check_image(outcome, run.ws, (64, 64))
    assert (outcome["seed"], outcome["model"]) == (5, "tiny")
    assert outcome["sha256"] != source["sha256"]
    job = {j["id"]: j for j in run.ws.jobs()}[outcome["job_id"]]
    assert (job["kind"], job["source_job_id"], job["prompt"]) == ("variation", source["job_id"], PROMPT)


def test_upscale_doubles_an_earlier_job(diffusions, first_image):
    source, run = first_image[1], diffusions["upscale"]
    outcome = run.outcome()
    upscaled = _check_image(outcome, run.ws, (128, 128))
    assert outcome["sha256"] != source["sha256"]
    job = {j["id"]: j for j in run.ws.jobs()}[outcome["job_id"]]
    assert (job["kind"], job["source_job_id"]) == ("upscale", source["job_id"])
    # An enlargement of the source, not a new picture: shrunk back, it is close to the source.
    back = upscaled.convert("RGB").resize((64, 64), Image.BILINEAR)
    original = Image.open(source["image_path"]).convert("RGB")
    diff = sum(abs(a - b) for p, q in zip(back.getdata(), original.getdata()) for a, b in zip(p, q))
    assert diff / (64 * 64 * 3) < 16


def test_zoom_out_keeps_the_earlier_image_exactly_in_the_middle(diffusions, first_image):
    source, run = first_image[1], diffusions["zoom"]
    outcome = run.outcome()
    zoomed = _check_image(outcome, run.ws, (128, 128))
    job = {j["id"]: j for j in run.ws.jobs()}[outcome["job_id"]]
    assert (job["kind"], job["outpaint"], job["source_job_id"], job["prompt"]) == (
        "edit", "zoom", source["job_id"], PROMPT)
    original = Image.open(source["image_path"]).convert("RGB")
    assert zoomed.convert("RGB").crop((32, 32, 96, 96)).tobytes() == original.tobytes()


def test_variation_of_a_missing_job_is_refused(workspace):
    result = workspace.run("variation", "999", "--seed", "5")
    assert result.returncode == 2
    assert "no job 999" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["variation", "upscale"])
def test_another_users_job_is_refused_as_if_missing(seeded_workspace, command):
    """Job 1 is the default user's; mallory may not reuse it (nor learn that it exists)."""
    before = seeded_workspace.jobs()
    result = seeded_workspace.run(command, "1", "--user", "mallory")
    missing = seeded_workspace.run(command, "999", "--user", "mallory")
    assert result.returncode == missing.returncode == 2
    assert result.stderr.strip() == missing.stderr.strip().replace("999", "1")
    assert "there is no job 1" in result.stderr and "Traceback" not in result.stderr
    assert seeded_workspace.jobs() == before  # nothing made, nothing reserved


def test_edit_repaints_only_inside_the_mask(diffusions):
    run = diffusions["edit"]
    outcome = run.outcome()
    result = _check_image(outcome, run.ws, EDIT_SIZE).convert("RGB")
    assert outcome["seed"] == 3
    source, mask = _noise(EDIT_SIZE).getdata(), _square_mask(EDIT_SIZE).getdata()
    pixels = list(zip(result.getdata(), source, mask))
    outside = [(got, was) for got, was, m in pixels if m == 0]
    inside = [(got, was) for got, was, m in pixels if m == 255]
    assert all(got == was for got, was in outside)
    assert sum(got != was for got, was in inside) > len(inside) // 2
    (job,) = run.ws.jobs()
    assert (job["kind"], job["prompt"]) == ("edit", "a red door")


@pytest.mark.parametrize("name, data, reason", [
    ("notes.png", b"just some text, no pixels here\n", "not an image"),
    ("page.png", b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>", "HTML page"),
    ("empty.png", b"", "empty"),
])
def test_edit_refuses_what_is_not_an_image(workspace, tmp_path, name, data, reason):
    (tmp_path / name).write_bytes(data)
    result = workspace.run("edit", str(tmp_path / name), "a red door")
    assert result.returncode == 2
    assert reason in result.stderr
    assert "Traceback" not in result.stderr
    assert workspace.jobs() == []


def test_edit_of_a_missing_file_is_refused(workspace, tmp_path):
    result = workspace.run("edit", str(tmp_path / "nowhere.png"), "a red door")
    assert result.returncode == 2
    assert "nowhere.png" in result.stderr
    assert "Traceback" not in result.stderr


def _limit_memory() -> None:
    # 1 GiB of address space: plenty for easel, not for the pixels the bomb declares.
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.parametrize("width, height", [(8000, 8000), (100_000, 100_000)])
def test_edit_refuses_a_decompression_bomb_without_decoding_it(workspace, tmp_path, width, height):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(width, height))
    assert bomb.stat().st_size < 4096
    started = time.perf_counter()
    result = workspace.run("edit", str(bomb), "a red door", timeout=60, preexec_fn=_limit_memory)
    assert time.perf_counter() - started < 10
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # The message says what is wrong: too many pixels, not "not an image".
    assert "pixels" in result.stderr, result.stderr
    assert workspace.jobs() == []


def test_edit_refuses_a_mask_of_another_size(workspace, tmp_path):
    _noise((64, 64)).save(tmp_path / "photo.png")
    _square_mask((32, 32)).save(tmp_path / "mask.png")
    result = workspace.run("edit", str(tmp_path / "photo.png"), "a red door",
                           "--mask", str(tmp_path / "mask.png"))
    assert result.returncode == 2
    assert "the mask is 32x32 but the image is 64x64" in result.stderr
    assert workspace.jobs() == []


# ---- jobs, models, check -------------------------------------------------------------------

def test_jobs_lists_newest_first(seeded_workspace):
    ws = seeded_workspace
    assert ws.run("budget", "set", "bob", "0").returncode == 0
    ws.job("imagine", "an nsfw poster", *SMALL, expect=3)
    ws.job("imagine", PROMPT, "--user", "bob", *SMALL, expect=4)

    jobs = ws.jobs()
    assert [(j["id"], j["status"], j["user_id"]) for j in jobs] == [
        (3, "refused", "bob"), (2, "blocked", "local"), (1, "done", "local")]
    assert [j["id"] for j in ws.jobs("--user", "bob")] == [3]
    assert [j["id"] for j in ws.jobs("--limit", "2")] == [3, 2]

    text = ws.run("jobs")
    assert text.returncode == 0
    assert [line.split()[:2] for line in text.stdout.splitlines()] == [
        ["3", "refused"], ["2", "blocked"], ["1", "done"]]


def test_models_lists_tiny(workspace):
    result = workspace.run("models")
    assert result.returncode == 0, result.stderr
    tiny = [line for line in result.stdout.splitlines() if line.split()[0] == "tiny"]
    assert len(tiny) == 1
    assert "local" in tiny[0] and "[default]" in tiny[0]


def test_check_passes_on_the_defaults(tmp_path):
    result = easel("check", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for expected in ("settings: built-in defaults (valid)", "model tiny (local): usable",
                     "image screening: nudenet: usable", "default model tiny: usable"):
        assert expected in lines
    assert list(tmp_path.iterdir()) == []  # checking creates nothing


# ---- serve ---------------------------------------------------------------------------------

def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})  # the path is sent as is
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_serve_gives_images_stable_cacheable_urls(seeded_workspace, first_image):
    ws, image = seeded_workspace, first_image[1]
    server = subprocess.Popen(ws.args("serve"), cwd=ws.root, env=_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if _get(ws.port, "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None, server.communicate()
            assert time.monotonic() < deadline, "easel serve did not start"
            time.sleep(0.1)

        path = f"/images/{image['sha256']}.png"
        assert image["image_url"].endswith(path)
        status, headers, body = _get(ws.port, path)
        assert status == 200
        assert hashlib.sha256(body).hexdigest() == image["sha256"]
        assert headers["content-type"] == "image/png"
        cache = [d.strip() for d in headers["cache-control"].split(",")]
        assert "immutable" in cache
        assert next(int(d[len("max-age="):]) for d in cache if d.startswith("max-age=")) >= 365 * 86400
        etag = headers["etag"]

        status, _, body = _get(ws.port, path, {"If-None-Match": etag})
        assert (status, body) == (304, b"")

        unknown = hashlib.sha256(b"never made").hexdigest()
        for bad in (f"/images/{unknown}.png", "/images/../../etc/passwd",
                    "/images/..%2F..%2Fetc%2Fpasswd.png", "/images/%2e%2e/%2e%2e/etc/passwd"):
            status, _, body = _get(ws.port, bad)
            assert status == 404, bad
            assert b"root:" not in body
    finally:
        server.send_signal(signal.SIGINT)
        try:
            out, err = server.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert server.returncode == 0, err
    assert "Traceback" not in err
    assert f":{ws.port}/images/" in out


def test_a_sampler_is_recorded_and_reproduces_the_same_pixels(diffusions):
    first = _outcome(diffusions["sampler"].result, 0)
    again = _outcome(diffusions["sampler again"].result, 0)
    assert pixels(first["image_path"]) == pixels(again["image_path"])
    recorded = {j["id"]: j for j in diffusions["sampler"].ws.jobs()}
    assert recorded[first["job_id"]]["options"] == {"sampler": "euler_a"}
