"""Prompt enhancement through any OpenAI-compatible chat completions endpoint (OpenAI, a local
Ollama or vLLM server, a gateway), with the official `openai` SDK. One call per prompt, under a
total deadline; its token usage is what the member pays."""
from __future__ import annotations

import asyncio
from typing import Any

from bot.core.models import Enhanced, GeneratorError, TransientGeneratorError

from .openai_images import translate_openai_error

SYSTEM = (
    "You rewrite short prompts for an image generator into one vivid, detailed prompt of at most "
    "60 words: keep the subject and every detail the user gave, and add style, lighting, "
    "composition and medium. Answer with the prompt only: no quotes, no preamble, no lists."
)
# The most a prompt may take in tokens (the system text and a prompt of up to 2000 characters):
# with max_tokens for the answer, this bounds what one enhancement can cost.
PROMPT_TOKENS_BOUND = 800


class ChatEnhancer:
    def __init__(self, *, model: str, api_key: str | None, base_url: str | None = None, timeout_s: float = 20.0,
                 max_tokens: int = 200, price_per_1k_tokens_usd: float = 0.0):
        self.model, self._api_key, self._base_url = model, api_key, base_url or None
        self.timeout_s, self.max_tokens, self.price = timeout_s, max_tokens, price_per_1k_tokens_usd
        self._client: Any = None

    @property
    def max_cost_usd(self) -> float:
        return (PROMPT_TOKENS_BOUND + self.max_tokens) / 1000 * self.price

    def _chat(self) -> Any:
        if self._client is None:
            from openai import AsyncOpenAI

            # A local server (Ollama, vLLM) takes any key; the SDK insists on one.
            self._client = AsyncOpenAI(api_key=self._api_key or "none", base_url=self._base_url,
                                       timeout=self.timeout_s, max_retries=0)
        return self._client

    async def enhance(self, prompt: str) -> Enhanced:
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await self._chat().chat.completions.create(
                    model=self.model, max_tokens=self.max_tokens, temperature=0.7,
                    messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}])
        except TimeoutError:
            raise TransientGeneratorError(f"the enhancer did not answer within {self.timeout_s:g} s") from None
        except Exception as exc:  # the SDK's errors, mapped as for image calls; the key never shown
            raise translate_openai_error(exc, service="the enhancer", api_key=self._api_key or "",
                                         timeout_s=self.timeout_s) from None
        choices = getattr(answer, "choices", None)
        if not choices or not isinstance(getattr(choices[0].message, "content", None), str):
            raise GeneratorError("the enhancer answered without a prompt")
        text = choices[0].message.content.strip().strip('"').strip()
        usage = getattr(answer, "usage", None)
        tokens = getattr(usage, "total_tokens", None) or (PROMPT_TOKENS_BOUND + self.max_tokens)
        return Enhanced(text, cost_usd=min(tokens, PROMPT_TOKENS_BOUND + self.max_tokens) / 1000 * self.price)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
