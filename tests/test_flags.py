import pytest

from bot.core.flags import FlagError, parse_flags, parse_size, size_for_aspect


def test_midjourney_style_flags():
    p = parse_flags("a castle in fog --seed 42 --no blurry, text --ar 16:9 --steps 8 --guidance 6.5 --model flux")
    assert p.prompt == "a castle in fog"
    assert (p.seed, p.negative_prompt, p.aspect, p.steps, p.guidance, p.model) == (
        42, "blurry, text", (16, 9), 8, 6.5, "flux")


def test_phone_dashes_are_flags_and_lone_dashes_are_text():
    assert parse_flags("a cat \u2014seed 7").seed == 7
    assert parse_flags("a cat \u2013no dogs").negative_prompt == "dogs"
    assert parse_flags("rock -- paper").prompt == "rock -- paper"


@pytest.mark.parametrize("text, message", [
    ("a cat --sed 4", "unknown flag --sed"),
    ("a cat --seed four", "--seed takes a whole number"),
    ("a cat --seed 99999999999", "--seed takes a whole number"),
    ("a cat --seed 1 --seed 2", "given twice"),
    ("a cat --ar 16:9 in the rain", "takes one value"),
    ("a cat --ar 0:9", "ratio like 16:9"),
    ("a cat --ar 9:1", "too extreme"),
    ("a cat --steps 0", "--steps"),
    ("a cat --guidance lots", "--guidance"),
    ("a cat --no", "needs a value"),
])
def test_bad_flags_are_clear_errors(text, message):
    with pytest.raises(FlagError, match=message.replace("-", "\\-")):
        parse_flags(text)


def test_sizes():
    assert parse_size("512x768") == (512, 768)
    with pytest.raises(FlagError):
        parse_size("big")
    for aspect in [(16, 9), (2, 1), (1, 1), (9, 16), (3, 2)]:
        w, h = size_for_aspect(aspect, 512 * 512)
        assert w % 8 == 0 and h % 8 == 0
        assert abs(w / h - aspect[0] / aspect[1]) / (aspect[0] / aspect[1]) < 0.02
        assert 0.85 < w * h / (512 * 512) < 1.15
