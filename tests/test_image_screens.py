"""Image screens beyond nudenet: a transformers classifier, channel policy, several screens at once.

The classifier tests load tiny random-weight models, built here from configs and saved with
save_pretrained, through the real loading code. A bias on the classifier head makes one label win
decisively, so the verdicts are deterministic whatever the random weights.
"""
import json
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from bot.core.models import Verdict
from moderation import (
    SPOILER,
    AllScreens,
    ChannelPolicy,
    ClassifierScreen,
    ImageScreenUnavailable,
    SafetyCheckerScreen,
    is_minors_rule,
    is_spoiler,
    judge_scores,
)
from moderation.classifier import local_files_only, looks_like_hub_id

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def noise_image(seed=0, size=(64, 48)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def build_vit(folder, bias, labels=("normal", "nsfw")):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
        intermediate_size=37, num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()  # the bias alone decides: the image cannot sway it
        model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    return {
        "normal": build_vit(root / "normal", [10.0, -10.0]),
        "nsfw": build_vit(root / "nsfw", [-10.0, 10.0]),
        # Probabilities 0.2 / 0.8 (softmax of log-odds): for threshold tests.
        "eighty": build_vit(root / "eighty", [0.0, float(np.log(4.0))]),
        "upper": build_vit(root / "upper", [-10.0, 10.0], labels=("SFW", "NSFW")),
    }


# The classifier, through the real transformers loading code.


def test_a_confident_nsfw_model_blocks_and_a_normal_one_allows(vit_models):
    flagged = ClassifierScreen(str(vit_models["nsfw"]), blocked={"nsfw": 0.5})
    assert flagged.unavailable_reason() is None
    verdict = flagged.screen_image(noise_image())
    assert not verdict.allowed
    assert verdict.rule == "nsfw"
    assert verdict.score == pytest.approx(1.0, abs=1e-6)
    assert "nsfw" in verdict.reason and "1.00" in verdict.reason

    plain = ClassifierScreen(str(vit_models["normal"]), blocked={"nsfw": 0.5})
    verdict = plain.screen_image(noise_image(1))
    assert verdict.allowed and verdict.rule is None
    assert verdict.score == pytest.approx(0.0, abs=1e-6)  # the nsfw label's score, for tuning


def test_any_image_mode_and_size_is_screened(vit_models):
    screen = ClassifierScreen(str(vit_models["nsfw"]), blocked={"nsfw": 0.5})
    images = [
        Image.new("L", (300, 200), 128),
        Image.new("RGBA", (20, 50), (255, 255, 255, 0)),
        noise_image(2, (512, 512)),
    ]
    assert [screen.screen_image(img).rule for img in images] == ["nsfw"] * 3


def test_thresholds_are_respected_at_or_above(vit_models):
    folder = str(vit_models["eighty"])
    img = noise_image()
    assert ClassifierScreen(folder, blocked={"nsfw": 0.8}).screen_image(img).score == pytest.approx(0.8)
    assert not ClassifierScreen(folder, blocked={"nsfw": 0.79}).screen_image(img).allowed
    assert ClassifierScreen(folder, blocked={"nsfw": 0.81}).screen_image(img).allowed
    # Any listed label can block, each at its own threshold; the rule names the one that did.
    verdict = ClassifierScreen(folder, blocked={"nsfw": 0.9, "normal": 0.1}).screen_image(img)
    assert (verdict.allowed, verdict.rule) == (False, "normal")
    assert verdict.score == pytest.approx(0.2)


def test_labels_match_case_insensitively_and_rules_are_lower_case(vit_models):
    screen = ClassifierScreen(str(vit_models["upper"]), blocked={"nsfw": 0.5})
    assert screen.unavailable_reason() is None
    assert screen.screen_image(noise_image()).rule == "nsfw"
    assert ClassifierScreen(str(vit_models["nsfw"]), blocked={"NSFW": 0.5}).screen_image(
        noise_image()
    ).rule == "nsfw"


def test_nsfw_allowed_labels_pass_in_nsfw_channels_only(vit_models):
    screen = ClassifierScreen(str(vit_models["nsfw"]), blocked={"nsfw": 0.5}, nsfw_allowed=frozenset({"NSFW"}))
    img = noise_image()
    assert screen.screen_image(img, nsfw_channel=False).rule == "nsfw"
    verdict = screen.screen_image(img, nsfw_channel=True)
    assert verdict.allowed and verdict.score == pytest.approx(1.0, abs=1e-6)
    strict = ClassifierScreen(str(vit_models["nsfw"]), blocked={"nsfw": 0.5})
    assert strict.screen_image(img, nsfw_channel=True).rule == "nsfw"


def test_a_missing_folder_is_reported_not_crashed_on(tmp_path):
    missing = tmp_path / "no-such-model"
    screen = ClassifierScreen(str(missing), blocked={"nsfw": 0.5})
    assert screen.unavailable_reason() == f"the image classifier folder {str(missing)!r} does not exist"
    with pytest.raises(ImageScreenUnavailable, match="does not exist"):
        screen.screen_image(noise_image())
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in ClassifierScreen(
        str(tmp_path / "empty"), blocked={"nsfw": 0.5}
    ).unavailable_reason()


def test_labels_the_model_lacks_are_reported(vit_models):
    screen = ClassifierScreen(str(vit_models["nsfw"]), blocked={"porn": 0.5})
    reason = screen.unavailable_reason()
    assert "has no label ['porn']" in reason and "['normal', 'nsfw']" in reason
    with pytest.raises(ImageScreenUnavailable, match="has no label"):
        screen.screen_image(noise_image())


def test_missing_transformers_is_reported(monkeypatch, vit_models):
    monkeypatch.setitem(sys.modules, "transformers", None)
    screen = ClassifierScreen(str(vit_models["nsfw"]), blocked={"nsfw": 0.5})
    assert screen.unavailable_reason() == (
        "the image classifier needs the 'local' extra (torch, transformers): pip install 'easel[local]'"
    )
    with pytest.raises(ImageScreenUnavailable, match="easel\\[local\\]"):
        screen.screen_image(noise_image())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"blocked": {}}, "at least one"),
        ({"blocked": {"nsfw": 0}}, "above 0 and at most 1"),
        ({"blocked": {"nsfw": 1.5}}, "above 0 and at most 1"),
        ({"blocked": {"nsfw": 0.5}, "nsfw_allowed": frozenset({"minor"})}, "minors"),
    ],
)
def test_bad_classifier_settings_are_rejected_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassifierScreen("somewhere", **kwargs)


def test_loading_is_lazy_and_happens_once_across_threads(vit_models, monkeypatch):
    from transformers import AutoModelForImageClassification

    screen = ClassifierScreen(str(vit_models["nsfw"]), blocked={"nsfw": 0.5})
    assert screen._loaded is None  # constructing loads nothing
    loads = []
    real = AutoModelForImageClassification.from_pretrained

    def counting(*args, **kwargs):
        loads.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForImageClassification, "from_pretrained", counting)
    barrier = threading.Barrier(4)
    results = [None] * 4

    def work(i):
        barrier.wait()
        results[i] = screen.screen_image(noise_image(i))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [True]  # once, and from the folder only
    assert [r.rule for r in results] == ["nsfw"] * 4


def test_only_a_hub_id_while_online_may_download(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert looks_like_hub_id("Falconsai/nsfw_image_detection")
    assert not local_files_only("Falconsai/nsfw_image_detection")
    for path in (str(tmp_path), "./models/x", "/models/x", "x", "tests/anything"):
        assert local_files_only(path), path  # "tests" exists here: a path, not an owner
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert local_files_only("Falconsai/nsfw_image_detection")


def test_judge_scores_picks_the_strongest_blocked_label():
    scores = {"drawings": 0.05, "hentai": 0.55, "porn": 0.7, "neutral": 0.1}
    blocked = {"hentai": 0.5, "porn": 0.5}
    assert judge_scores(scores, blocked=blocked).rule == "porn"
    assert judge_scores(scores, blocked=blocked, allowed_here=frozenset({"porn"})).rule == "hentai"
    assert judge_scores(scores, blocked=blocked, allowed_here=frozenset(blocked)) == Verdict(
        allowed=True, score=0.7
    )


# The safety checker diffusers ships for Stable Diffusion, tiny and random.


def build_safety_checker(folder, concept_threshold):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 99},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        # A concept is flagged when cosine similarity (in [-1, 1]) exceeds its weight.
        checker.concept_embeds_weights.fill_(concept_threshold)
        checker.special_care_embeds_weights.fill_(2.0)
    checker.save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor"
    )
    return folder


@pytest.fixture(scope="module")
def safety_checkers(tmp_path_factory):
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("checker")
    return {"flags": build_safety_checker(root / "flags", -2.0), "passes": build_safety_checker(root / "passes", 2.0)}


def test_the_safety_checker_blocks_what_it_flags(safety_checkers):
    flags = SafetyCheckerScreen(safety_checkers["flags"])
    assert flags.unavailable_reason() is None
    img = noise_image()
    assert flags.screen_image(img) == Verdict(
        allowed=False,
        rule="nsfw",
        reason="the image was flagged as NSFW by the Stable Diffusion safety checker",
    )
    assert flags.screen_image(img, nsfw_channel=True).rule == "nsfw"
    assert SafetyCheckerScreen(safety_checkers["flags"], allow_in_nsfw_channels=True).screen_image(
        img, nsfw_channel=True
    ).allowed
    assert SafetyCheckerScreen(safety_checkers["passes"]).screen_image(img) == Verdict(allowed=True)
    # The checker's own folder, with its image processor beside it, works as well.
    flat = safety_checkers["flags"] / "safety_checker"
    config = json.loads((safety_checkers["flags"] / "feature_extractor" / "preprocessor_config.json").read_text())
    (flat / "preprocessor_config.json").write_text(json.dumps(config))
    assert SafetyCheckerScreen(flat).screen_image(Image.new("L", (40, 70), 3)).rule == "nsfw"


def test_a_missing_safety_checker_is_reported(tmp_path):
    screen = SafetyCheckerScreen(tmp_path / "nothing")
    assert "does not exist" in screen.unavailable_reason()
    with pytest.raises(ImageScreenUnavailable, match="does not exist"):
        screen.screen_image(noise_image())


# Channel policy and several screens, with fake screens returning fixed verdicts.


class Fixed:
    def __init__(self, verdict, reason=None):
        self.verdict = verdict
        self.reason = reason
        self.calls = []

    def screen_image(self, image, *, nsfw_channel=False):
        self.calls.append(nsfw_channel)
        return self.verdict

    def unavailable_reason(self):
        return self.reason


def block(rule, score=0.9):
    return Verdict(allowed=False, rule=rule, reason=f"flagged as {rule}", score=score)


POLICY = {"nudity": "allow", "NSFW": "spoiler", "gore": "block"}


@pytest.mark.parametrize(
    "rule,expected",
    [
        ("nudity", Verdict(allowed=True, score=0.9)),
        ("nsfw", Verdict(allowed=True, rule="nsfw", reason=SPOILER, score=0.9)),
        ("gore", block("gore")),
        ("weapons", block("weapons")),  # unnamed: the default, "block"
    ],
)
def test_nsfw_channels_apply_the_policy_per_category(rule, expected):
    inner = Fixed(block(rule))
    screen = ChannelPolicy(inner, POLICY)
    assert screen.screen_image(None, nsfw_channel=True) == expected
    assert inner.calls == [False]  # the inner screen is always asked strictly


def test_spoiler_verdicts_are_recognisable():
    verdict = ChannelPolicy(Fixed(block("nsfw")), {"nsfw": "spoiler"}).screen_image(None, nsfw_channel=True)
    assert is_spoiler(verdict) and verdict.allowed and verdict.rule == "nsfw"
    assert not is_spoiler(Verdict(allowed=True)) and not is_spoiler(block("nsfw"))


def test_the_default_covers_unnamed_categories():
    screen = ChannelPolicy(Fixed(block("weapons")), POLICY, default="spoiler")
    assert is_spoiler(screen.screen_image(None, nsfw_channel=True))
    assert ChannelPolicy(Fixed(block(None)), {}, default="allow").screen_image(None, nsfw_channel=True).allowed


@pytest.mark.parametrize("rule", ["nudity", "nsfw", "gore", "weapons"])
def test_ordinary_channels_always_block(rule):
    screen = ChannelPolicy(Fixed(block(rule)), POLICY, default="allow")
    assert screen.screen_image(None) == block(rule)
    assert screen.screen_image(None, nsfw_channel=False) == block(rule)


@pytest.mark.parametrize("rule", ["minors", "Minor", "suggestive_minor", "csam", "CSAM"])
@pytest.mark.parametrize("default", ["allow", "spoiler"])
def test_minors_are_never_allowed_whatever_the_policy(rule, default):
    assert is_minors_rule(rule)
    screen = ChannelPolicy(Fixed(block(rule)), {"nudity": "allow"}, default=default)
    assert screen.screen_image(None, nsfw_channel=True) == block(rule)
    assert screen.screen_image(None) == block(rule)


@pytest.mark.parametrize(
    "policy,default,message",
    [
        ({"minors": "allow"}, "block", "minors"),
        ({"csam": "spoiler"}, "block", "minors"),
        ({"nudity": "maybe"}, "block", '"allow", "spoiler" or "block"'),
        ({}, "hide", '"allow", "spoiler" or "block"'),
    ],
)
def test_bad_policies_are_rejected_clearly(policy, default, message):
    with pytest.raises(ValueError, match=message):
        ChannelPolicy(Fixed(block("x")), policy, default=default)


def test_allowed_verdicts_pass_through_the_policy():
    verdict = Verdict(allowed=True, score=0.1)
    screen = ChannelPolicy(Fixed(verdict, reason="nope"), {"nudity": "block"})
    assert screen.screen_image(None, nsfw_channel=True) is verdict
    assert screen.unavailable_reason() == "nope"


def test_all_screens_run_in_order_and_the_first_block_wins():
    first, second, third = Fixed(Verdict(allowed=True, score=0.2)), Fixed(block("gore")), Fixed(block("nsfw"))
    screen = AllScreens([first, second, third])
    assert screen.screen_image(None, nsfw_channel=True) == block("gore")
    assert (first.calls, second.calls, third.calls) == ([True], [True], [])  # stops at the block


def test_all_screens_allow_with_the_highest_score():
    screens = [Fixed(Verdict(allowed=True, score=0.2)), Fixed(Verdict(allowed=True)),
               Fixed(Verdict(allowed=True, score=0.4))]
    assert AllScreens(screens).screen_image(None) == Verdict(allowed=True, score=0.4)
    assert AllScreens([Fixed(Verdict(allowed=True))]).screen_image(None) == Verdict(allowed=True)


def test_all_screens_keep_a_spoiler_unless_something_blocks():
    spoiler = Verdict(allowed=True, rule="nsfw", reason=SPOILER, score=0.9)
    assert AllScreens([Fixed(Verdict(allowed=True, score=0.95)), Fixed(spoiler)]).screen_image(None) == spoiler
    assert AllScreens([Fixed(spoiler), Fixed(block("gore"))]).screen_image(None) == block("gore")


def test_all_screens_report_the_first_unavailable_screen():
    ok = Fixed(Verdict(allowed=True))
    assert AllScreens([ok, ok]).unavailable_reason() is None
    screen = AllScreens([ok, Fixed(ok.verdict, reason="first"), Fixed(ok.verdict, reason="second")])
    assert screen.unavailable_reason() == "first"
    with pytest.raises(ValueError, match="at least one"):
        AllScreens([])


def test_policy_and_classifier_together(vit_models):
    classifier = ClassifierScreen(str(vit_models["nsfw"]), blocked={"nsfw": 0.5})
    screen = AllScreens([ChannelPolicy(classifier, {"nsfw": "spoiler"}), Fixed(Verdict(allowed=True, score=0.1))])
    assert screen.unavailable_reason() is None
    img = noise_image()
    assert screen.screen_image(img).rule == "nsfw" and not screen.screen_image(img).allowed
    verdict = screen.screen_image(img, nsfw_channel=True)
    assert is_spoiler(verdict) and verdict.rule == "nsfw" and verdict.score == pytest.approx(1.0, abs=1e-6)


# The screens as the settings wire them, through a job.

async def test_the_configured_classifier_screens_every_output_and_the_channel_policy_applies(vit_models, tmp_path):
    from bot.bootstrap import image_screen_names
    from bot.config import settings_from_dict
    from tests.fakes.generators import PreparedGenerator
    from tests.helpers import job_request, start_app

    settings = settings_from_dict({
        "storage": {"database": str(tmp_path / "e.db"), "images_dir": str(tmp_path / "img")},
        "generation": {"default_model": "fake-model"},
        "moderation": {"image_classifier": "none", "classifier_model": str(vit_models["nsfw"]),
                       "classifier_labels": {"nsfw": 0.8}, "nsfw_policy": {"nsfw": "spoiler"}},
    })
    assert image_screen_names(settings) == [f"classifier {vit_models['nsfw']}"]
    app = start_app(settings, generators=[PreparedGenerator()])
    try:
        blocked = await app.service.submit(job_request("imagine", "u1", "a beach"))
        spoiled = await app.service.submit(job_request("imagine", "u1", "a beach", nsfw_channel=True))
        [event] = app.moderation.recent()
    finally:
        await app.close()
    assert blocked.status == "blocked" and "image classifier as nsfw" in blocked.error
    assert (event.stage, event.rule) == ("output", "nsfw") and event.score > 0.99
    assert spoiled.ok and spoiled.job.spoiler is True
