import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from moderation import (
    DEFAULT_PROMPT_RULES,
    EXPOSED_LABELS,
    NUDENET_LABELS,
    ImageScreenUnavailable,
    NoImageScreen,
    NudeNetScreen,
    PromptRule,
    PromptScreen,
    Verdict,
    judge_detections,
)

RULES = [
    PromptRule("csam", ("loli*", "child porn*")),
    PromptRule("explicit", ("nude*", "naked", "sex"), allow_in_nsfw_channels=True),
    PromptRule("gore", ("blood bath", "gore")),
    PromptRule("insults", ("ass",)),
]


@pytest.fixture(scope="module")
def screen():
    return PromptScreen(RULES)


def blocked_rule(screen, text, **kwargs):
    verdict = screen.screen_prompt(text, **kwargs)
    return None if verdict.allowed else verdict.rule


@pytest.mark.parametrize(
    "text",
    [
        "a nude portrait",
        "NUDE",
        "N u D e figure",
        "nu-de",
        "n.u.d.e",
        "n_u_d_e",
        "nu\u200bde",  # zero-width space
        "ｎｕｄｅ",  # fullwidth
        "nüdé",
        "nud3",
        "NuD3S",
        "nudе",  # Cyrillic е
        "n@ked",
        "$ex",
        "5 3 x",
    ],
)
def test_evasions_of_a_term_still_match(screen, text):
    assert blocked_rule(screen, text) == "explicit"


@pytest.mark.parametrize(
    "text",
    [
        "a class photo",
        "an assistant at a desk",
        "a glass of water, bass guitar, passage",
        "Essex countryside, Middlesex",
        "lol i love this",  # separate words do not join into "loli"
        "it's exciting",
        "a bloody bathroom",
        "",
    ],
)
def test_innocent_words_containing_terms_are_allowed(screen, text):
    assert screen.screen_prompt(text) == Verdict(allowed=True)


@pytest.mark.parametrize(
    "text", ["a blood bath", "bloodbath", "blood-bath", "BLOOD  BATH", "b l o o d b a t h"]
)
def test_multi_word_terms_match_with_or_without_the_break(screen, text):
    assert blocked_rule(screen, text) == "gore"


def test_words_are_only_broken_where_the_term_has_a_space():
    screen = PromptScreen([PromptRule("r", ("bloodbath",))])
    assert blocked_rule(screen, "blood-bath") == "r"  # punctuation joins
    assert blocked_rule(screen, "blood bath") is None  # two words, and the term is one


@pytest.mark.parametrize(
    "text",
    ["nudes", "nudesss", "nu-des", "child pornography", "childporn", "child p o r n", "l0l1"],
)
def test_prefix_terms_match_longer_words(screen, text):
    assert blocked_rule(screen, text) is not None


def test_prefix_terms_still_need_the_whole_prefix_and_a_word_start(screen):
    assert blocked_rule(screen, "nud") is None
    assert blocked_rule(screen, "denudes") is None
    assert blocked_rule(screen, "lollipop") is None
    assert blocked_rule(screen, "nudity") is None  # "nude*" does not cover it: that needs "nud*"


def test_exact_terms_do_not_match_longer_words(screen):
    assert blocked_rule(screen, "nakedness") is None
    assert blocked_rule(screen, "sextant") is None
    assert blocked_rule(screen, "gory") is None


def test_nsfw_channels_exempt_only_the_rules_that_allow_it(screen):
    assert blocked_rule(screen, "a nude figure", nsfw_channel=True) is None
    assert blocked_rule(screen, "a nude figure", nsfw_channel=False) == "explicit"
    assert blocked_rule(screen, "blood bath", nsfw_channel=True) == "gore"
    assert blocked_rule(screen, "loli", nsfw_channel=True) == "csam"


def test_the_earliest_rule_is_reported_when_several_match(screen):
    # "csam" is listed first, though its term comes later in the text.
    assert blocked_rule(screen, "nude loli") == "csam"
    assert blocked_rule(screen, "gore nude") == "explicit"


@pytest.mark.parametrize(
    "text,term",
    [
        ("a NUDE model", "nude"),
        ("n.a.k.e.d", "naked"),
        ("childporn", "porn"),
        ("kiss my ass", "ass"),
    ],
)
def test_reason_names_the_rule_but_never_the_words(screen, text, term):
    verdict = screen.screen_prompt(text)
    assert not verdict.allowed
    assert f"'{verdict.rule}'" in verdict.reason
    assert term not in verdict.reason.lower()


def test_reason_says_when_an_age_restricted_channel_would_allow_it(screen):
    assert "age-restricted" in screen.screen_prompt("nude").reason
    assert "age-restricted" not in screen.screen_prompt("gore").reason


def test_a_long_prompt_screens_correctly():
    # Its time is a benchmark's (bench.moderation: 8 ms clean, 19 ms with an evasion, on a 2-core VM).
    screen = PromptScreen(DEFAULT_PROMPT_RULES)
    filler = "an oil painting of a lighthouse at dusk, 4k, 35mm, by a master, glass, class; "
    clean = (filler * (20_000 // len(filler) + 1))[:20_000]
    dirty = clean[:10_000] + " n u d e " + clean[10_000:]
    assert screen.screen_prompt(clean).allowed
    assert screen.screen_prompt(dirty).rule == "explicit"


def test_default_rules_block_the_obvious_and_pass_ordinary_prompts():
    screen = PromptScreen(DEFAULT_PROMPT_RULES)
    assert blocked_rule(screen, "a naked woman") == "explicit"
    assert blocked_rule(screen, "pornographic", nsfw_channel=True) is None
    assert blocked_rule(screen, "underage girl", nsfw_channel=True) == "csam"
    assert blocked_rule(screen, "lolita fashion, sweet pastel dress") is None
    for prompt in [
        "a cat astronaut floating in space, digital art",
        "portrait of an old fisherman, 85mm, bokeh",
        "Sussex landscape, a sextant on a desk, classic car",
    ]:
        assert screen.screen_prompt(prompt).allowed, prompt


@pytest.mark.parametrize(
    "rules,message",
    [
        ([PromptRule("a", ("x",)), PromptRule("a", ("y",))], "defined twice"),
        ([PromptRule(" ", ("x",))], "needs a name"),
        ([PromptRule("a", ())], "needs a list of terms"),
        ([PromptRule("a", "nude")], "needs a list of terms"),
        ([PromptRule("a", ("nu*de",))], "only allowed at the end"),
        ([PromptRule("a", ("--",))], "no letters or digits"),
    ],
)
def test_bad_rules_are_rejected_clearly(rules, message):
    with pytest.raises(ValueError, match=message):
        PromptScreen(rules)


# Image screening. nudenet's output: {"class": label, "score": float, "box": [x, y, w, h]}.


def detection(label, score):
    return {"class": label, "score": score, "box": [10, 20, 100, 120]}


def test_judge_blocks_exposed_labels_at_or_above_the_threshold():
    verdict = judge_detections(
        [detection("FACE_FEMALE", 0.95), detection("FEMALE_BREAST_EXPOSED", 0.87)],
        threshold=0.5,
        blocked_labels=EXPOSED_LABELS,
    )
    assert verdict == Verdict(
        allowed=False,
        rule="nudity",
        reason="the image was flagged as explicit (exposed nudity, score 0.87)",
        score=0.87,
    )
    assert not judge_detections(
        [detection("ANUS_EXPOSED", 0.5)], threshold=0.5, blocked_labels=EXPOSED_LABELS
    ).allowed


def test_judge_allows_exposed_labels_below_the_threshold():
    verdict = judge_detections(
        [detection("MALE_GENITALIA_EXPOSED", 0.31), detection("BUTTOCKS_EXPOSED", 0.42)],
        threshold=0.5,
        blocked_labels=EXPOSED_LABELS,
    )
    assert verdict == Verdict(allowed=True, score=0.42)


def test_judge_allows_covered_and_face_labels_whatever_their_score():
    detections = [
        detection(label, 0.99)
        for label in [
            "FACE_FEMALE", "FACE_MALE", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED", "BELLY_EXPOSED"
        ]
    ]
    for found in (detections, []):
        verdict = judge_detections(found, threshold=0.5, blocked_labels=EXPOSED_LABELS)
        assert verdict == Verdict(allowed=True)


def test_our_label_list_matches_the_installed_nudenet():
    import nudenet.nudenet

    assert NUDENET_LABELS == set(getattr(nudenet.nudenet, "__labels"))
    assert EXPOSED_LABELS <= NUDENET_LABELS


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"threshold": 0}, "between 0 and 1"),
        ({"threshold": 1.5}, "between 0 and 1"),
        ({"blocked_labels": frozenset({"FEMALE_BREAST_EXPOSD"})}, "unknown nudenet labels"),
        ({"blocked_labels": frozenset()}, "at least one"),
        ({"nsfw_channel_policy": "maybe"}, '"allow" or "block"'),
    ],
)
def test_bad_image_screen_settings_are_rejected_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NudeNetScreen(**kwargs)


def noise_image(seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8), "RGB")


def skin_blobs_image():
    """Abstract blurred skin-toned ellipses that the 320n model scores ~0.79 FEMALE_BREAST_EXPOSED:
    a deterministic way to drive the blocking path through the real model without real imagery."""
    img = Image.new("RGB", (512, 512), (217, 163, 130))
    draw = ImageDraw.Draw(img)
    draw.ellipse([6, 70, 216, 246], fill=(203, 123, 96))
    draw.ellipse([252, 217, 409, 453], fill=(248, 197, 148))
    draw.ellipse([342, 221, 389, 421], fill=(230, 120, 121))
    draw.ellipse([357, 313, 373, 329], fill=(158, 60, 60))
    return img.filter(ImageFilter.GaussianBlur(6))


@pytest.fixture(scope="module")
def nudenet_screen():
    return NudeNetScreen()


def test_real_detector_allows_plain_images(nudenet_screen):
    import nudenet

    assert nudenet_screen.unavailable_reason() is None
    images = [
        noise_image(),
        Image.new("RGB", (512, 512), (40, 90, 200)),
        Image.new("L", (300, 200), 128),  # greyscale and not square
        Image.new("RGBA", (256, 256), (255, 255, 255, 0)),
    ]
    for img in images:
        assert nudenet_screen.screen_image(img).allowed
    assert isinstance(nudenet_screen.detector, nudenet.NudeDetector)


def test_real_detector_blocks_and_sees_the_image_as_opencv_would(nudenet_screen, tmp_path):
    img = skin_blobs_image()
    verdict = nudenet_screen.screen_image(img)
    assert not verdict.allowed
    assert verdict.rule == "nudity"
    assert verdict.score > 0.6
    # The in-memory array must be what nudenet gets from a file (BGR): same detections exactly.
    path = tmp_path / "blobs.png"
    img.save(path)
    from_file = nudenet_screen.detector.detect(str(path))
    assert max(d["score"] for d in from_file) == pytest.approx(verdict.score, abs=1e-5)


def test_nsfw_channel_policy(nudenet_screen):
    img = skin_blobs_image()
    assert nudenet_screen.screen_image(img, nsfw_channel=True).allowed  # default policy "allow"
    strict = NudeNetScreen(nsfw_channel_policy="block")
    assert strict.screen_image(img, nsfw_channel=True).rule == "nudity"
    assert strict.screen_image(img, nsfw_channel=False).rule == "nudity"
    lenient = NudeNetScreen(threshold=0.9)
    assert lenient.screen_image(img).allowed


def test_concurrent_screening_loads_one_detector_and_agrees(monkeypatch):
    import nudenet

    created = []

    class CountingDetector(nudenet.NudeDetector):
        def __init__(self):
            created.append(self)
            time.sleep(0.05)  # widen the window in which a second thread could also load one
            super().__init__()

    monkeypatch.setattr(nudenet, "NudeDetector", CountingDetector)
    screen = NudeNetScreen()
    images = [skin_blobs_image(), noise_image(1)] * 3
    barrier = threading.Barrier(len(images))
    results: dict[int, Verdict] = {}
    errors = []

    def work(i):
        try:
            barrier.wait()
            results[i] = screen.screen_image(images[i])
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(created) == 1 and screen.detector is created[0]
    assert [results[i].allowed for i in range(len(images))] == [False, True] * 3
    assert len({results[i].score for i in range(0, len(images), 2)}) == 1


def test_missing_extra_is_reported_not_crashed_on(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # what an uninstalled package looks like
    screen = NudeNetScreen()
    assert screen.unavailable_reason() == (
        "the NSFW image classifier needs the 'nsfw' extra: pip install 'easel[nsfw]'"
    )
    with pytest.raises(ImageScreenUnavailable, match="easel\\[nsfw\\]"):
        screen.screen_image(noise_image())


def test_no_image_screen_allows_everything():
    screen = NoImageScreen()
    assert screen.unavailable_reason() is None
    assert screen.screen_image(skin_blobs_image()) == Verdict(allowed=True)
