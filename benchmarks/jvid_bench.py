#!/usr/bin/env python3
"""JVID: image vs video UNet calls per preset against the expectation, and wall time against plain AnimateDiff DDPM.

Run:  python3 benchmarks/jvid_bench.py [--frames 8] [--size 64] [--steps 50] [--seeds 20] [--repeats 3]

One process, the same tiny random-weight modules (``tests/core/tiny.py``: the sd15tiny UNet2DConditionModel as the
image model and a UNetMotionModel built from it with a tiny MotionAdapter as the video model, AnimateDiff's linear
schedule as the master), the same random text embeddings, CFG 2.0 as one [uncond, cond] batch on both models.

Printed:
  * per preset, UNet forward calls (pre-hooks) of the video and the image model averaged over --seeds runs, next to
    the expectation sum_i P_V(u_i) (METHODS.md §4.5: 23 of 50 video steps for preset 256, 34 for 128);
  * wall time (median of --repeats after a warm-up) of ``core.jvid.jvid_sample`` per preset against the baseline:
    plain AnimateDiff DDPM with the same step count, written with diffusers' ``DDPMScheduler`` (linear betas,
    leading grid, fixed-small variance) and the same motion UNet and CFG, in the same process.
Timings are printed, never asserted.
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
from videobridge.core import jvid  # noqa: E402
from videobridge.core.denoisers import Branch, UNet2DDenoiser, VideoDenoiser, cfg  # noqa: E402
from videobridge.core.schedule import ANIMATEDIFF_SCHEDULER_CONFIG, NoiseSchedule  # noqa: E402


def plain_ddpm(video, shape, guidance, steps, seed):
    """AnimateDiff DDPM the ordinary way: diffusers' DDPMScheduler driving the video denoiser."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**{k: v for k, v in ANIMATEDIFF_SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    sched.set_timesteps(steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    for t in sched.timesteps:
        x = sched.step(video(x, int(t), guidance), t, x, generator=gen).prev_sample
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="pixel size (latents are size/8)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=20, help="runs averaged for the call counts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    unet2d, motion = tiny.unet2d(0), tiny.motion_unet(1)
    image = UNet2DDenoiser(unet2d, NoiseSchedule.sd15())
    video = VideoDenoiser(motion, NoiseSchedule.animatediff())
    g = cfg(Branch(tiny.text(1)), Branch(tiny.text(2)), 2.0)
    shape = (1, 4, args.frames, args.size // 8, args.size // 8)

    def timed(fn):
        fn()
        out = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    print(f"JVID, {args.frames} frames, {args.size}x{args.size} px, {args.steps} DDPM steps, CFG 2.0, "
          f"{args.threads} threads; calls averaged over {args.seeds} seeds, times median of {args.repeats}")
    with torch.inference_mode():
        base = timed(lambda: plain_ddpm(video, shape, g, args.steps, 0))
        print(f"{'baseline: diffusers DDPM, AnimateDiff':40} video calls {args.steps:5.1f}  image calls   0.0"
              f"  time {base:.3f} s  1.00x")
        for name in ("256", "128", "64"):
            params = jvid.preset(name, steps=args.steps)
            v0, i0 = video.calls, image.calls
            for seed in range(args.seeds):
                jvid.jvid_sample(image, video, shape, g, g, seed, params)
            n_v, n_i = (video.calls - v0) / args.seeds, (image.calls - i0) / args.seeds
            t = timed(lambda: jvid.jvid_sample(image, video, shape, g, g, 0, params))
            print(f"{'JVID preset ' + name:40} video calls {n_v:5.1f}  image calls {n_i:5.1f}  time {t:.3f} s  "
                  f"{t / base:.2f}x   expected video steps {jvid.expected_video_steps(params):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
