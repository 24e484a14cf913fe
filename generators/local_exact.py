"""Batch-invariant inference for the local generator: with batching on, a batched image is
bit-identical to the same job run alone.

Stock CPU kernels round differently by batch size (measured with torch 2.13, MKL and oneDNN): a
2-D Linear (the timestep embedding, SDXL's pooled projection) takes one MKL kernel for one row,
another for two or three and a third for multiples of four; oneDNN convolutions take another
algorithm for a batch of one (any batch of two or more gives each row the same result, whatever its
position or the other rows); GroupNorm on channels-last activations (after the VAE's attention)
splits its sums by batch. So 2-D Linears run one row at a time, the UNet and ControlNet never run
a batch of one (a lone row is doubled, the copy dropped), and the VAE decodes one image at a time.
A row's result then depends neither on the batch size nor on its position or the other rows. The
cost: a lone image without guidance runs the UNet at batch two; a batch costs what it did.
Not verified for Flux's transformer, on GPUs (cuDNN and cuBLAS choose kernels by shape) or with
torch.compile.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MARK = "_easel_batch_invariant"
_NEVER_ALONE = ("unet", "controlnet")  # the components that run per step, on the latent batch


def make_batch_invariant(pipe: Any) -> None:
    """Make the pipeline's results independent of the batch size. Idempotent and cheap: run it
    before each call, as a LoRA loaded since brings Linears of its own."""
    import torch

    for name, component in getattr(pipe, "components", {}).items():
        if not isinstance(component, torch.nn.Module):
            continue
        for module in component.modules():
            if isinstance(module, torch.nn.Linear) and not getattr(module, _MARK, False):
                module.forward = _one_row_at_a_time(module.forward, torch)
                setattr(module, _MARK, True)
        if name in _NEVER_ALONE and not getattr(component, _MARK, False):
            component.forward = _never_alone(component.forward, torch)
            setattr(component, _MARK, True)
    vae = getattr(pipe, "vae", None)
    if vae is not None and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()


def _one_row_at_a_time(forward: Callable[..., Any], torch: Any) -> Callable[..., Any]:
    def rows(x: Any, *args: Any, **kwargs: Any) -> Any:
        if x.ndim == 2 and x.shape[0] > 1:
            return torch.cat([forward(row, *args, **kwargs) for row in x.split(1)])
        return forward(x, *args, **kwargs)

    return rows


def _never_alone(forward: Callable[..., Any], torch: Any) -> Callable[..., Any]:
    """Runs a batch of one as a batch of two (the row and its copy) and returns the first row."""

    def doubled(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.cat([value, value]) if value.ndim and value.shape[0] == 1 else value
        if isinstance(value, (list, tuple)):
            return type(value)(doubled(v) for v in value)
        if isinstance(value, dict):
            return {k: doubled(v) for k, v in value.items()}
        return value

    def first(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value[:1]
        if isinstance(value, dict):  # diffusers' output dataclasses are dicts too
            return type(value)(**{k: first(v) for k, v in value.items()})
        if isinstance(value, (list, tuple)):
            return type(value)(first(v) for v in value)
        return value

    def run(*args: Any, **kwargs: Any) -> Any:
        sample = args[0] if args else kwargs.get("sample")
        if not isinstance(sample, torch.Tensor) or sample.shape[0] != 1:
            return forward(*args, **kwargs)
        return first(forward(*doubled(args), **doubled(kwargs)))

    return run
