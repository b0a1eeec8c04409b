"""Where a training step of the classic conv VAE spends its time on a GPU, and what the next speed-ups are worth.

Times the bare step (forward, backward, Adam; uint8 batch already on the device) with CUDA events, median of
`--steps`, bf16 channels-last, for: the literal decoder (nearest upsample, then conv 5x5) with cuDNN's
autotuner (`torch.backends.cudnn.benchmark`) off and on, eager and compiled; and the sub-pixel decoder the
model uses (`vae.models.conv.subpixel_conv`: the same function as one 3x3 convolution with 4x the output
channels at the low resolution and a pixel shuffle, 36 taps per output pixel instead of 100). Then prints the
top CUDA kernels of the compiled literal decoder: what the sub-pixel form removes.

    python bench/gpu_profile.py [--batch 16384] [--steps 20] [--out RESULT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from vae.config import LossSection
from vae.models import build_model
from vae.objectives.elbo.losses import training_loss

LOSS = LossSection()


def build(subpixel: bool, device: str) -> nn.Module:
    """The conv VAE as it runs (sub-pixel decoder), or with the literal upsample + conv 5x5 decoder."""
    torch.manual_seed(0)
    model = build_model("conv", (1, 28, 28), 2)
    if not subpixel:
        model.decode_params = model.reference_decode_params
    return model.to(device)


def step_times(model: nn.Module, images: torch.Tensor, batch: int, steps: int, compiled: bool) -> list[float]:
    model = model.to(memory_format=torch.channels_last)
    if compiled:
        model.compile()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 3):
        xb = images[(i * batch) % (len(images) - batch) :][:batch]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x = xb.float().div_(255.0).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = training_loss(model, x, LOSS, 0).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    images = torch.randint(0, 256, (4 * args.batch, 1, 28, 28), dtype=torch.uint8, device="cuda")
    rows = []
    for name, benchmark, compiled, subpixel in (
        ("eager, cudnn.benchmark off", False, False, False),
        ("eager, cudnn.benchmark on", True, False, False),
        ("compiled, cudnn.benchmark on", True, True, False),
        ("sub-pixel decoder, eager, benchmark on", True, False, True),
        ("sub-pixel decoder, compiled, benchmark on", True, True, True),
    ):
        torch.backends.cudnn.benchmark = benchmark
        start = time.perf_counter()
        times = step_times(build(subpixel, "cuda"), images, args.batch, args.steps, compiled)
        median = statistics.median(times)
        rows.append({"config": name, "median_step_s": round(median, 5), "img_s": round(args.batch / median),
                     "spread": round((max(times) - min(times)) / median, 3),
                     "wall_s_incl_compile": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    torch.backends.cudnn.benchmark = True
    model = build(False, "cuda").to(memory_format=torch.channels_last)  # literal decoder
    model.compile()
    step_times(model, images, args.batch, 2, False)  # warm (already compiled in place)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step_times(model, images, args.batch, 5, False)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70)
    print(table)
    if args.out:
        args.out.write_text(json.dumps({"batch": args.batch, "device": torch.cuda.get_device_name(),
                                        "torch": torch.__version__, "rows": rows, "profile": table}, indent=2))


if __name__ == "__main__":
    main()
