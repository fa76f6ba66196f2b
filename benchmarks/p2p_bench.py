#!/usr/bin/env python3
"""Prompt2Prompt cost: a frame-wise edit (source + edit copy of every frame, CFG-batched, attention edits on the first
40% of steps, optional LocalBlend) against plain frame-wise DDIM of the same 2F latents with the same prompts (the
same UNet batch without the controller), in the same process.

Run:  python3 benchmarks/p2p_bench.py [--frames 8] [--size 256] [--steps 10] [--repeats 3] [--threads 2]

Model: the tiny "sd15tiny" SD1.5-layout UNet (``tests/core/tiny.py``, attention at every level, random weights) at
``--size`` pixels (latents size/8). The controller recomputes the conditional rows' attention from explicit
probabilities on every spatial layer while it edits cross-attention (and self-attention on layers of <= 256 query
tokens), and keeps LocalBlend's word maps; the ratio shows what that costs. UNet calls are counted (they must be
equal). Timings are printed (median of ``--repeats``), never asserted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tests.conftest  # noqa: E402,F401  (registers the package as ``videobridge``)
from tests.core import tiny  # noqa: E402
from videobridge.core import prompt2prompt as P  # noqa: E402
from videobridge.core.denoisers import Branch, UNet2DDenoiser, cfg  # noqa: E402
from videobridge.core.samplers import ddim_sample  # noqa: E402
from videobridge.core.schedule import NoiseSchedule  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sd = NoiseSchedule.sd15()
    grid = sd.timesteps(args.steps)
    h = args.size // 8
    x = torch.randn(1, 4, args.frames, h, h, generator=torch.Generator().manual_seed(0))
    src, dst, null = tiny.text(1), tiny.text(2), tiny.text(3)
    edit = P.Prompt2PromptEdit("replace", int(0.4 * (args.steps + 1)), int(0.4 * args.steps), mapper=torch.eye(77))
    blend = torch.zeros(2, 77)
    blend[:, 2] = 1
    blended = P.Prompt2PromptEdit("replace", edit.cross_steps, edit.self_steps, mapper=torch.eye(77),
                                  blend_tokens=blend)
    text = torch.cat([src, dst]).repeat(args.frames, 1, 1)
    unet = tiny.unet2d(0)

    def plain():
        d = UNet2DDenoiser(unet, sd)
        ddim_sample(d, P.interleave(x), grid, cfg(Branch(text), Branch(null), 7.5))
        return d.calls

    def p2p(e):
        def run():
            d = UNet2DDenoiser(unet, sd)
            P.prompt2prompt(d, x, grid, e, P.pair_guidance(src, dst, null, 7.5, x.shape[2]))
            return d.calls
        return run

    rows = []
    with torch.inference_mode():
        for name, fn in (("plain frame-wise DDIM, 2F latents", plain), ("Prompt2Prompt edit", p2p(edit)),
                         ("Prompt2Prompt edit + LocalBlend", p2p(blended))):
            calls = fn()                                                   # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            rows.append((name, calls, statistics.median(times)))
    base = rows[0][2]
    print(f"{args.frames} frames, {args.size}x{args.size}, {args.steps} steps, CFG 7.5, sd15tiny, "
          f"{args.threads} threads")
    print(f"{'run':<36} {'UNet calls':>10} {'median s':>9} {'vs plain':>9}")
    for name, calls, t in rows:
        print(f"{name:<36} {calls:>10} {t:>9.3f} {t / base:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
