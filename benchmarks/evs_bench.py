#!/usr/bin/env python3
"""EVS (VBEVSRefine's core): UNet calls against the algorithm's minimum, wall time with SFI on/off, bank bytes.

Run:  python3 benchmarks/evs_bench.py [--frames 8] [--size 64] [--t2i-steps 50] [--repeats 3] [--device cpu]

One process, the same tiny random-weight modules for every run (``tests/core/tiny.py``: the "sd15tiny"
UNet2DConditionModel as the T2I model and a UNetMotionModel built from it with a tiny MotionAdapter as the T2V
model, AnimateDiff schedule on the 8-step trailing grid as for Lightning), the same clean source latent, the same
random text embeddings and seed. ``core.evs.evs_refine`` is called exactly as VBEVSRefine calls it (T2I CFG 7.5 as
one [uncond, cond] batch, T2V CFG 1, the METHODS.md §5.4 defaults: s1 0.4, t_T2V 201, t_V 499, n_V 4).

Printed:
  * UNet forward calls per model (forward pre-hooks) next to the algorithm's minimum: T2I steps from t1 + 1
    re-evaluation at t_T2V + n_V T2V steps (+ the inversion steps in "inversion_sfi" mode);
  * wall time (median of --repeats after one warm-up, ``time.perf_counter``) of the SDEdit block (the baseline of
    the ratios) and of the inversion + SFI block with the 'deep' and 'shallow' presets, as ratios to the baseline;
  * the bytes the SFI bank held in each run (``FeatureBank.nbytes``, equal to ``estimate_bank_bytes``), and the
    estimate at real SD1.5 widths (meta-device UNet, no weights) for 16 frames at 512x512 and 1024x1024.
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
from videobridge.core import evs  # noqa: E402
from videobridge.core.attention import estimate_bank_bytes, layer_table, resolve_layers  # noqa: E402
from videobridge.core.denoisers import Branch, UNet2DDenoiser, VideoDenoiser, cfg, single  # noqa: E402
from videobridge.core.schedule import NoiseSchedule  # noqa: E402


def count_calls(module):
    box = {"n": 0}
    module.register_forward_pre_hook(lambda *a: box.__setitem__("n", box["n"] + 1))
    return box


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="pixel size (latents are size/8)")
    ap.add_argument("--t2i-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    unet2d = tiny.unet2d(0).to(dev)
    motion = tiny.motion_unet(1).to(dev)
    image = UNet2DDenoiser(unet2d, NoiseSchedule.sd15())
    video = VideoDenoiser(motion, NoiseSchedule.animatediff())
    calls_i, calls_v = count_calls(unet2d), count_calls(motion)
    h = args.size // 8
    z0 = torch.randn(1, 4, args.frames, h, h, generator=torch.Generator().manual_seed(0)).to(dev)
    g_i = cfg(Branch(tiny.text(1).to(dev)), Branch(tiny.text(2).to(dev)), 7.5)
    g_v = single(Branch(tiny.text(1).to(dev)))
    runs = {"sdedit block": evs.EVSParams(t2i_steps=args.t2i_steps),
            "inversion + SFI, deep": evs.EVSParams(t2i_steps=args.t2i_steps, block="inversion_sfi",
                                                   sfi_layers="deep", sfi_gamma=0.8),
            "inversion + SFI, shallow": evs.EVSParams(t2i_steps=args.t2i_steps, block="inversion_sfi")}
    print(f"EVS refine, {args.frames} frames, {args.size}x{args.size} px, T1 = {args.t2i_steps}, "
          f"device {dev}, {args.threads} threads, median of {args.repeats}")
    print(f"{'run':26} {'T2I calls':>9} {'T2V calls':>9} {'total':>6} {'minimum':>7} {'time s':>8} "
          f"{'vs sdedit':>9} {'bank bytes':>11}")
    base = None
    for name, params in runs.items():
        grid_v = evs.t2v_grid(video.schedule, params.t2v_steps, params.t2v_spacing, params.t_V, params.n_V)
        banks = []
        original = evs.sfi_invert

        def spy(*a, **k):
            out = original(*a, **k)
            banks.append(out[1].nbytes)
            return out

        evs.sfi_invert = spy
        try:
            with torch.inference_mode():
                evs.evs_refine(image, video, z0, g_i, g_v, 0, params)                     # warm-up, counted
                ci, cv = calls_i["n"], calls_v["n"]
                calls_i["n"] = calls_v["n"] = 0
                times = []
                for _ in range(args.repeats):
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    evs.evs_refine(image, video, z0, g_i, g_v, 0, params)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                calls_i["n"] = calls_v["n"] = 0
        finally:
            evs.sfi_invert = original
        t = statistics.median(times)
        base = base or t
        print(f"{name:26} {ci:9d} {cv:9d} {ci + cv:6d} {evs.unet_calls(params, grid_v):7d} {t:8.3f} "
              f"{t / base:8.2f}x {banks[-1] if banks else 0:11d}")

    with torch.device("meta"):
        from diffusers import UNet2DConditionModel
        real = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    for preset in ("shallow", "deep"):
        layers = resolve_layers(layer_table(real), preset)
        for px in (512, 1024):
            b = estimate_bank_bytes(layer_table(real), layers, 16, (px // 8, px // 8), 4)
            print(f"real SD1.5 widths, '{preset}' ({len(layers)} layers), 16 frames, {px}x{px}, n_V = 4 steps: "
                  f"bank {b / 1024 ** 3:.2f} GiB fp16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
