"""Screening: the prompt and any upload before money is reserved, and every output (results
and step previews) before anyone sees it. Image work runs in a worker thread."""

from __future__ import annotations

import asyncio

from .models import (
    Blocked,
    ErrorCode,
    GeneratedImage,
    GenerationRequest,
    JobRequest,
    JobStatus,
    Kind,
    Refusal,
)
from .ports import DecodedImage, ImageCodec, ImageScreen, NoObserver, Observer, PromptScreen

# An allowed verdict with this reason: post the image as a spoiler (see moderation.image).
SPOILER = "spoiler"
# An output whose aspect ratio is further than this from the asked one was not made as asked.
ASPECT_TOLERANCE = 0.03


class Screening:
    def __init__(
        self, prompts: PromptScreen, images: ImageScreen, codec: ImageCodec, observer: Observer | None = None
    ):
        self.prompts, self.images, self.codec = prompts, images, codec
        self.observer: Observer = observer or NoObserver()

    async def screen_request(self, request: JobRequest, gen: GenerationRequest) -> None:
        """Raise a blocking Refusal if the prompt or an uploaded image may not be used."""
        nsfw = request.requester.nsfw_channel
        text = " ".join(filter(None, [gen.prompt, gen.negative_prompt]))
        # Off the loop: a semantic screen embeds the prompt (and loads its model the first time).
        verdict = await asyncio.to_thread(self.prompts.screen_prompt, text, nsfw_channel=nsfw)
        if not verdict.allowed:
            self.observer.blocked("prompt", verdict.rule or "unknown")
            raise Blocked(
                verdict.reason or "blocked",
                stage="prompt",
                rule=verdict.rule or "unknown",
                score=verdict.score,
            )
        if gen.kind in (Kind.EDIT, Kind.VARIATION) and request.image is not None:
            assert gen.source_image is not None
            image = await asyncio.to_thread(self.codec.decode, gen.source_image)
            verdict = await asyncio.to_thread(self.images.screen_image, image.image, nsfw_channel=nsfw)
            if not verdict.allowed:
                self.observer.blocked("upload", verdict.rule or "unknown")
                raise Blocked(
                    f"the uploaded image: {verdict.reason}",
                    stage="upload",
                    rule=verdict.rule or "unknown",
                    score=verdict.score,
                )

    async def validate(self, result: GeneratedImage, gen: GenerationRequest) -> DecodedImage:
        """The decoded output; a failing Refusal when it is not a usable image of the size asked."""
        try:
            return await asyncio.to_thread(self._validate, result, gen)
        except self.codec.rejected as exc:
            raise Refusal(
                ErrorCode.FAILED, f"{result.model} returned an unusable image: {exc}", JobStatus.FAILED
            ) from None

    async def output_blocked(self, checked: DecodedImage, nsfw_channel: bool) -> Blocked | bool:
        """The block if the image screen does not pass an output; else whether it is to be shown
        as a spoiler (an age-restricted channel's policy for its category)."""
        verdict = await asyncio.to_thread(self.images.screen_image, checked.image, nsfw_channel=nsfw_channel)
        if verdict.allowed:
            return verdict.reason == SPOILER
        self.observer.blocked("output", verdict.rule or "unknown")
        return Blocked(
            f"the result was blocked: {verdict.reason or 'blocked'}",
            stage="output",
            rule=verdict.rule or "unknown",
            score=verdict.score,
        )

    def preview_allowed(self, png: bytes, nsfw_channel: bool) -> bool:
        """For a step preview (blocking: call it in a thread). Undecodable previews are not shown."""
        try:
            decoded = self.codec.decode(png)
        except self.codec.rejected:
            return False
        return self.images.screen_image(decoded.image, nsfw_channel=nsfw_channel).allowed

    def _validate(self, result: GeneratedImage, gen: GenerationRequest) -> DecodedImage:
        checked = self.codec.decode(result.data, reject_blank=True)
        if (checked.width, checked.height) != (result.width, result.height):
            raise self.codec.rejected(
                f"it is {checked.width}x{checked.height}, not the {result.width}x{result.height} reported"
            )
        want, got = gen.width / gen.height, checked.width / checked.height
        if abs(got - want) / want > ASPECT_TOLERANCE:
            raise self.codec.rejected(f"it is {checked.width}x{checked.height}, not {gen.width}x{gen.height}")
        return checked
