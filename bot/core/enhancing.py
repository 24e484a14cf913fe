"""Prompt enhancement, a step of the job: after the money is reserved (the enhancement's most
possible cost included), a chat model expands the prompt; the expanded prompt is what is then
screened, drawn, recorded and shown, with the prompt as typed beside it. A failed enhancement
uses the prompt as typed (with a note) or fails the job, as configured."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .models import (
    ErrorCode,
    GeneratorError,
    JobStatus,
    Refusal,
    usd_to_micros,
)
from .planning import Plan
from .ports import PromptEnhancer
from .prompting import clean_text, visible

NOT_SET_UP = "prompt enhancement is not set up on this server (an [enhance] model in its settings)"


@dataclass(frozen=True)
class Enhancement:
    plan: Plan  # with the expanded prompt
    original: str | None  # the prompt as typed; None: it was used as typed
    cost_micros: int = 0
    note: str | None = None


class Enhancer:
    def __init__(self, enhancer: PromptEnhancer | None, *, on_failure: str, max_prompt_chars: int):
        self.enhancer, self.on_failure, self.max_prompt_chars = enhancer, on_failure, max_prompt_chars

    @property
    def available(self) -> bool:
        return self.enhancer is not None

    def allowance_micros(self) -> int:
        return usd_to_micros(self.enhancer.max_cost_usd) if self.enhancer is not None else 0

    async def apply(self, plan: Plan) -> Enhancement:
        assert self.enhancer is not None, NOT_SET_UP
        typed = plan.request.prompt
        try:
            enhanced = await self.enhancer.enhance(typed)
            limit = min(self.max_prompt_chars, plan.route.spec.max_prompt_chars)
            text = clean_text(enhanced.prompt.strip(), "enhanced prompt", 100_000)[:limit].strip()
            if not visible(text):
                raise GeneratorError("the chat model answered with an empty prompt")
        except GeneratorError as exc:
            if self.on_failure == "refuse":
                raise Refusal(
                    ErrorCode.FAILED, f"prompt enhancement failed: {exc}", JobStatus.FAILED
                ) from None
            note = f"prompt enhancement failed ({exc}); the prompt was used as typed"
            return Enhancement(plan, None, note=note)
        request = replace(plan.request, params=plan.request.params.but(prompt=text))
        return Enhancement(replace(plan, request=request), typed, usd_to_micros(enhanced.cost_usd))
