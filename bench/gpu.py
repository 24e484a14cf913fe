"""UNet throughput on a GPU, with random weights built from configs (nothing is downloaded).

SD 1.5-sized (860M parameters, 512x512, latents 64x64) and SDXL-sized (2.6B, 1024x1024, latents
128x128, with its added text-time conditioning) UNets in float16, at batch 1 and 4, classifier-
free guidance on (the UNet sees 2x the batch, as in a real call), eager and with torch.compile
plus channels-last. Prints one JSON object: it/s (UNet steps per second for the whole batch),
images/s at 30 steps, and the speed-up of batch 4 over batch 1 in images/s.

References for an A100 (SD 1.5, batch 1): ~31 it/s out of the box, ~47 it/s compiled with
channels-last; the goal is >= 2.5x images/s at batch 4 over batch 1.

    python bench/gpu.py [--models sd15,sdxl] [--iters 20] [--no-compile] > gpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
MODELS = {"sd15": (SD15, 512, 768, 77), "sdxl": (SDXL, 1024, 2048, 77)}
STEPS_PER_IMAGE = 30


def build(config: dict, dtype, compiled: bool):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to("cuda", dtype).eval()
    if compiled:
        unet.to(memory_format=torch.channels_last)
        unet = torch.compile(unet, mode="max-autotune-no-cudagraphs", fullgraph=True)
    return unet


def inputs(name: str, batch: int, dtype):
    import torch

    config, side, width, tokens = MODELS[name]
    n = 2 * batch  # classifier-free guidance: the unconditioned and conditioned halves
    args = {
        "sample": torch.randn(n, 4, side // 8, side // 8, device="cuda", dtype=dtype),
        "timestep": torch.tensor(500, device="cuda"),
        "encoder_hidden_states": torch.randn(n, tokens, width, device="cuda", dtype=dtype),
    }
    if name == "sdxl":
        args["added_cond_kwargs"] = {
            "text_embeds": torch.randn(n, 1280, device="cuda", dtype=dtype),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * n, device="cuda", dtype=dtype),
        }
    return args


def measure(unet, args: dict, iters: int) -> float:
    import torch

    with torch.inference_mode():
        for _ in range(3):  # warm-up (and, compiled, the compilation itself)
            unet(**args)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(iters):
            unet(**args)
        torch.cuda.synchronize()
    return iters / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU"}))
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    dtype = torch.float16
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "float16",
              "steps_per_image": STEPS_PER_IMAGE, "runs": []}
    for name in args.models.split(","):
        for compiled in (False,) if args.no_compile else (False, True):
            unet = build(MODELS[name][0], dtype, compiled)
            per_batch = {}
            for batch in (1, 4):
                its = measure(unet, inputs(name, batch, dtype), args.iters)
                per_batch[batch] = its * batch / STEPS_PER_IMAGE
                result["runs"].append({"model": name, "size": MODELS[name][1], "batch": batch,
                                       "compiled": compiled, "it_per_s": round(its, 2),
                                       "images_per_s": round(per_batch[batch], 3)})
                print(json.dumps(result["runs"][-1]), file=sys.stderr)
            result["runs"][-1]["batch4_speedup"] = round(per_batch[4] / per_batch[1], 2)
            del unet
            torch.cuda.empty_cache()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
