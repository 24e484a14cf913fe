import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from bot.config import (
    GENERATORS,
    A1111Settings,
    CloudGeneratorSettings,
    ClusterSettings,
    ComfyUISettings,
    ConfigError,
    FireworksSettings,
    GoogleSettings,
    LocalGeneratorSettings,
    OpenAISettings,
    ReplicateSettings,
    Settings,
    TogetherSettings,
    load_settings,
    queue_limits,
    settings_from_dict,
)

ROOT = Path(__file__).resolve().parent.parent


def _keys(obj, prefix=""):
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        if isinstance(value, BaseModel):
            yield from _keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


@pytest.fixture(autouse=True)
def _no_easel_variables(monkeypatch):
    """These tests set the EASEL_* variables they need; none leak in from the shell."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("EASEL_"):
            monkeypatch.delenv(name)


def test_example_config_documents_every_key_with_its_default():
    text = (ROOT / "config.example.toml").read_text()
    raw = tomllib.loads(text)
    example = settings_from_dict(raw, where="config.example.toml")
    defaults = Settings()
    for key in _keys(defaults):
        if key == "moderation.prompt_rules":
            assert "[moderation.prompt_rules." in text
            continue
        a, b = example, defaults
        for part in key.split("."):
            a, b = getattr(a, part), getattr(b, part)
        written = raw
        for part in key.split("."):
            assert part in written, f"{key} is not written out in config.example.toml"
            written = written[part]
        assert a == b, f"config.example.toml shows {key} = {a!r}, but the default is {b!r}"


@pytest.mark.parametrize("data, message", [
    ({"generation": {"defualt_model": "x"}}, "unknown key 'generation.defualt_model' (did you mean 'generation.default_model'?)"),
    ({"nope": {}}, "unknown key 'nope'"),
    ({"queue": {"max_jobs_per_user": "3"}}, "'queue.max_jobs_per_user' must be an integer"),
    ({"queue": {"max_jobs_per_user": True}}, "'queue.max_jobs_per_user' must be an integer"),
    ({"server": {"port": 70000}}, "'server.port' must be 1-65535"),
    ({"generators": {"local": {"models": {"a": 1}}}}, "'generators.local.models.a' must be a string"),
    ({"moderation": {"nsfw_threshold": 1.5}}, "'moderation.nsfw_threshold'"),
    ({"storage": "x"}, "'storage' must be a table"),
])
def test_bad_settings_name_the_key_and_file(data, message):
    with pytest.raises(ConfigError) as err:
        settings_from_dict(data, where="easel.toml")
    assert str(err.value).startswith("easel.toml: ") and message in str(err.value)


def test_file_lookup_order_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EASEL_CONFIG", raising=False)
    assert load_settings().source is None  # no file: defaults
    (tmp_path / "easel.toml").write_text('[generation]\ndefault_model = "here"\n')
    assert load_settings().generation.default_model == "here"
    other = tmp_path / "conf" / "other.toml"
    other.parent.mkdir()
    other.write_text('[storage]\ndatabase = "db/x.db"\n')
    monkeypatch.setenv("EASEL_CONFIG", str(other))
    s = load_settings()
    assert s.source == other and s.path(s.storage.database) == other.parent / "db" / "x.db"
    assert load_settings(str(tmp_path / "easel.toml")).generation.default_model == "here"
    with pytest.raises(ConfigError, match="not found"):
        load_settings(str(tmp_path / "missing.toml"))
    (tmp_path / "bad.toml").write_text("[storage\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(str(tmp_path / "bad.toml"))


def test_a_partial_table_keeps_the_other_defaults(monkeypatch):
    s = settings_from_dict({"generators": {"openai": {"timeout_s": 5}, "replicate": {"enabled": False}}})
    assert s.generators.openai.api_key_env == "OPENAI_API_KEY" and s.generators.openai.timeout_s == 5
    assert s.generators.replicate.api_key_env == "REPLICATE_API_TOKEN"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    assert s.generators.openai.api_key() == "sk-from-env"
    assert s.generators.together.api_key_env == "TOGETHER_API_KEY"
    assert s.generators.replicate.enabled is False and s.generators.replicate.timeout_s == 120.0


@pytest.mark.parametrize("data, message", [
    ({"generation": {"job_timeout_s": float("inf")}}, "'generation.job_timeout_s' must be a finite number"),
    ({"generation": {"default_strength": 0}}, "'generation.default_strength' must be in (0, 1]"),
    ({"generation": {"max_upload_pixels": 0}}, "'generation.max_upload_pixels' must be positive"),
    ({"budget": {"period": "year"}}, "'budget.period' must be day, week or month"),
    ({"budget": {"daily_spend_cap_usd": "1"}}, "'budget.daily_spend_cap_usd' must be a number, not '1'"),
    ({"generators": {"openai": {"timeot_s": 1}}},
     "unknown key 'generators.openai.timeot_s' (did you mean 'generators.openai.timeout_s'?)"),
    ({"generators": {"openai": {"api_key_env": " "}}}, "'generators.openai.api_key_env' must name an environment variable"),
    ({"generators": {"local": {"models": {}}}}, "'generators.local.models' cannot be empty"),
    ({"generators": {"local": {"enabled": 1}}}, "'generators.local.enabled' must be true or false"),
    ({"discord": {"sync_guilds": "123"}}, "'discord.sync_guilds' must be a list of strings"),
    ({"discord": {"sync_guilds": ["abc"]}}, "'discord.sync_guilds' must be guild ids (digits)"),
    ({"moderation": {"prompt_rules": {"x": {"terms": ["a", 2]}}}}, "'moderation.prompt_rules.x.terms[1]' must be a string"),
    ({"routing": {"fallbacks": {"a": 1}}}, "'routing.fallbacks.a' must be a string"),
    ({"_env_file": ".env"}, "unknown key '_env_file'"),
    ({"generators": {"cluster": {"max_batch_size": 8, "max_ongoing_requests": 4}}},
     "'generators.cluster.max_ongoing_requests' must be at least max_batch_size"),
])
def test_more_bad_settings(data, message):
    with pytest.raises(ConfigError) as err:
        settings_from_dict(data, where="easel.toml")
    assert str(err.value).startswith("easel.toml: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_lists_and_tables_from_toml():
    s = settings_from_dict(tomllib.loads(
        '[discord]\nsync_guilds = ["1", "2"]\n[generators.openai]\nmodels = ["dall-e-3"]\n'
        'prices = { "dall-e-3/standard/1024x1024" = 1 }\n'
        '[moderation.prompt_rules.x]\nterms = ["a*"]\n'))
    assert s.discord.sync_guilds == ("1", "2") and s.generators.openai.models == ("dall-e-3",)
    assert s.generators.openai.prices == {"dall-e-3/standard/1024x1024": 1.0}
    assert isinstance(s.generators.openai.prices["dall-e-3/standard/1024x1024"], float)
    assert s.moderation.prompt_rules["x"].terms == ("a*",)
    assert s.moderation.prompt_rules["x"].allow_in_nsfw_channels is False
    assert Settings().moderation.prompt_rules is None


def test_settings_are_frozen():
    s = settings_from_dict({"server": {"port": 9000}})
    with pytest.raises(ValidationError):
        s.server = s.server
    with pytest.raises(ValidationError):
        s.server.port = 1
    with pytest.raises(ValidationError):
        s.generators.openai = s.generators.openai
    with pytest.raises(ValidationError):
        s.generators.openai.timeout_s = 1.0
    with pytest.raises((ValidationError, AttributeError)):
        s.source = Path("x")


def test_source_and_base_dir_are_not_settings(tmp_path):
    for key in ("source", "base_dir"):
        with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
            settings_from_dict({key: "x"})
    (tmp_path / "e.toml").write_text('source = "elsewhere"\n')
    with pytest.raises(ConfigError, match="unknown key 'source'"):
        load_settings(str(tmp_path / "e.toml"))
    assert Settings().source is None and Settings().base_dir == Path.cwd()


def test_environment_beats_the_file_and_init_beats_the_environment(tmp_path, monkeypatch):
    conf = tmp_path / "easel.toml"
    conf.write_text('[server]\nhost = "0.0.0.0"\nport = 7000\n[generation]\ndefault_model = "file"\n')
    assert load_settings(str(conf)).server.port == 7000
    monkeypatch.setenv("EASEL_SERVER__PORT", "9000")
    monkeypatch.setenv("EASEL_GENERATION__DEFAULT_MODEL", "sd")
    monkeypatch.setenv("EASEL_GENERATORS__OPENAI__TIMEOUT_S", "5")
    monkeypatch.setenv("EASEL_GENERATORS__LOCAL__ENABLED", "false")
    monkeypatch.setenv("EASEL_DISCORD__SYNC_GUILDS", '["1", "2"]')
    s = load_settings(str(conf))
    assert (s.server.host, s.server.port) == ("0.0.0.0", 9000)  # the file's host, the env's port
    assert s.generation.default_model == "sd" and s.generators.openai.timeout_s == 5.0
    assert s.generators.openai.api_key_env == "OPENAI_API_KEY"  # the rest of the table: defaults
    assert s.generators.local.enabled is False and s.discord.sync_guilds == ("1", "2")
    assert s.source == conf and s.base_dir == tmp_path
    # values passed in directly win over the environment, which fills in the rest
    s = settings_from_dict({"server": {"port": 1234}})
    assert s.server.port == 1234 and s.generation.default_model == "sd"
    # a string setting takes the variable's text as it is
    monkeypatch.setenv("EASEL_GENERATION__DEFAULT_MODEL", "123")
    assert load_settings(str(conf)).generation.default_model == "123"
    # without a file, the environment still applies
    monkeypatch.chdir(tmp_path / "..")
    monkeypatch.delenv("EASEL_CONFIG", raising=False)
    assert load_settings().server.port == 9000


@pytest.mark.parametrize("name, value, message", [
    ("EASEL_SERVER__PORT", "abc", "environment: 'EASEL_SERVER__PORT' must be an integer"),
    ("EASEL_SERVER__PORT", "70000", "environment: 'EASEL_SERVER__PORT' must be 1-65535"),
    ("EASEL_SERVER__PORT", "90.5", "environment: 'EASEL_SERVER__PORT' must be an integer"),
    ("EASEL_GENERATION__DEFAULT_STRENGTH", "nan", "environment: 'EASEL_GENERATION__DEFAULT_STRENGTH' must be a finite number"),
    ("EASEL_GENERATORS__LOCAL__ENABLED", "maybe", "environment: 'EASEL_GENERATORS__LOCAL__ENABLED' must be true or false"),
    ("EASEL_DISCORD__SYNC_GUILDS", "1,2", "environment: 'EASEL_DISCORD__SYNC_GUILDS' must be a list of strings"),
    ("EASEL_SERVER__PROT", "1", "environment: unknown key 'EASEL_SERVER__PROT' (did you mean 'EASEL_SERVER__PORT'?)"),
    ("EASEL_SERVR__PORT", "1", "environment: unknown key 'EASEL_SERVR__PORT' (did you mean 'EASEL_SERVER__PORT'?)"),
    ("EASEL_GENERATORS__LOCAL__MODELS", '{"a": 1}',
     "environment: 'generators.local.models.a' (from EASEL_GENERATORS__LOCAL__MODELS) must be a string"),
])
def test_a_bad_variable_is_named_in_one_line(tmp_path, monkeypatch, name, value, message):
    conf = tmp_path / "easel.toml"
    conf.write_text("[server]\nport = 7000\n")
    monkeypatch.setenv(name, value)
    for load in (lambda: load_settings(str(conf)), lambda: settings_from_dict({})):
        with pytest.raises(ConfigError) as err:
            load()
        assert str(err.value) == message
    monkeypatch.setenv("EASEL_CONFIG", str(conf))  # EASEL_CONFIG itself is no setting
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_registry_lists_every_generator_and_queue_limits_read_it():
    assert [e.name for e in GENERATORS] == ["local", "openai", "replicate", "together", "google", "fireworks",
                                            "comfyui", "a1111", "cluster"]
    assert [e.settings_class for e in GENERATORS] == [
        LocalGeneratorSettings, OpenAISettings, ReplicateSettings, TogetherSettings, GoogleSettings,
        FireworksSettings, ComfyUISettings, A1111Settings, ClusterSettings]
    s = settings_from_dict({"generators": {"local": {"max_concurrent": 2}, "together": {"max_concurrent": 7}}})
    assert list(type(s.generators).model_fields) == [e.name for e in GENERATORS]
    for e in GENERATORS:
        assert isinstance(e.section(s), e.settings_class) and e.section(s) is getattr(s.generators, e.name)
        assert ":" in e.target and e.target.startswith("generators.")
    assert queue_limits(s) == {"local": 2, "openai": 4, "replicate": 4, "together": 7, "google": 4, "fireworks": 4,
                               "comfyui": 4, "a1111": 2, "cluster": 8}
    assert all(issubclass(c, CloudGeneratorSettings) for c in (OpenAISettings, ReplicateSettings, TogetherSettings))


def test_registry_targets_are_the_generator_classes():
    pytest.importorskip("aiohttp")
    import inspect

    for e in GENERATORS:
        if e.name == "local":
            continue  # importing it is cheap, but keep this test free of the local extra
        cls = e.load()
        assert cls.__name__ == e.target.rsplit(":", 1)[1]
        first = {"comfyui": "servers", "a1111": "servers", "cluster": "address"}.get(e.name, "api_key")
        assert list(inspect.signature(cls.__init__).parameters)[1] == first


def test_generator_kwargs(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    s = settings_from_dict({
        "storage": {"images_dir": str(tmp_path / "data" / "images")},
        "generators": {"openai": {"models": ["dall-e-3"], "timeout_s": 5},
                       "local": {"upscaler": "", "steps": 8}},
    })
    openai = s.generators.openai
    assert openai.generator_kwargs(s) is None  # no key: not built
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert openai.generator_kwargs(s) == {
        "api_key": "sk-test", "base_url": None, "timeout_s": 5.0, "prices": None,
        "enabled_models": ["dall-e-3"],
    }
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8-test")
    off = settings_from_dict({"generators": {"replicate": {"enabled": False}}})
    assert off.generators.replicate.generator_kwargs(off) is None  # disabled: not built, key or not
    local = s.generators.local.generator_kwargs(s)
    assert local == {
        "models": {"tiny": "tiny"}, "data_dir": tmp_path / "data", "device": "auto", "dtype": "auto",
        "default_steps": 8, "default_guidance": 0.0, "price_per_second_usd": 0.001, "upscaler": None,
    }
    assert settings_from_dict({"generators": {"local": {"enabled": False}}}).generators.local.generator_kwargs(s) is None


def test_secrets_never_show(monkeypatch, tmp_path):
    secret = "sk-very-secret-value"
    for name in ("OPENAI_API_KEY", "REPLICATE_API_TOKEN", "TOGETHER_API_KEY", "DISCORD_TOKEN"):
        monkeypatch.setenv(name, secret)
    s = settings_from_dict({})
    assert s.generators.openai.api_key() == secret and s.discord.token() == secret
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.generators), repr(s.discord)):
        assert secret not in text
    conf = tmp_path / "easel.toml"
    conf.write_text("[server]\nport = 0\n")
    errors = []
    for name in ("EASEL_SERVER__PORT", "EASEL_GENERATORS__OPENAI__API_KEY", "EASEL_DISCORD__TOKEN",
                 "EASEL_GENERATORS__LOCAL__MODELS", "EASEL_DISCORD__MAX_COUNT"):
        monkeypatch.setenv(name, secret)
        for load in (lambda: load_settings(str(conf)), lambda: settings_from_dict({})):
            with pytest.raises(ConfigError) as err:
                load()
            errors.append(str(err.value))
        monkeypatch.delenv(name)
    with pytest.raises(ConfigError) as err:
        load_settings(str(conf))  # a file error while the keys are set
    errors.append(str(err.value))
    assert errors and all(secret not in e for e in errors)
    assert all(e.startswith(("environment: ", f"{conf}: ")) for e in errors)


def test_defaults_are_valid_settings():
    s = Settings()
    assert settings_from_dict(s.model_dump()) == s
