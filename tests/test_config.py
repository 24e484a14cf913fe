import tomllib
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from bot.config import ConfigError, Settings, load_settings, settings_from_dict

ROOT = Path(__file__).resolve().parent.parent


def _keys(obj, prefix=""):
    for f in fields(obj):
        if f.metadata.get("internal"):
            continue
        value = getattr(obj, f.name)
        if is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


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
