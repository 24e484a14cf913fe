"""Which generation requests may share one batched pipeline call: the rules the local generator
and the Ray Serve pool both batch by. Requests with the same key differ only in what a batch
carries per image (prompt, negative prompt, seed), so each image of a batch is exactly what the
request would give alone."""
from __future__ import annotations

from collections.abc import Hashable

from bot.core.models import GenerationRequest, Kind


def batch_key(request: GenerationRequest) -> Hashable | None:
    """The key of the requests this one may be batched with, or None when it runs alone (an
    edit, a variation or an upscale carries its own input image)."""
    if request.kind != Kind.IMAGINE or request.source_image is not None or request.mask_image is not None:
        return None
    p = request.params
    return (p.model, p.size, p.steps, p.guidance, tuple(sorted(p.options.items())))
