#!/usr/bin/env python3
"""Activation memory per model family: working memory of one UNet call of full-size SD1.5 (UNet2DConditionModel),
AnimateDiff v2 (UNetMotionModel) and ZeroScope (UNet3DConditionModel), per latent row and latent pixel, as ratios to
SD1.5's. The pack's memory estimate (``nodes/runtime.py``: ComfyUI's SD1.5 formula) scales video-model calls by these
ratios (``ACTIVATION_FACTOR``).

Run:  python3 benchmarks/activation_bench.py [--frames 8] [--size 256] [--threads 2]

Each family runs in a fresh subprocess: random weights (float32, diffusers' default configs: nothing is downloaded),
built on the meta device and materialised on the CPU, then one call on ``2 x frames`` latents of ``size/8`` squared
(CFG-batched rows, as the samplers call them; the image model gets the same number of rows). After a warm-up call
(which fills kernel caches and reorders weights once), the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs`` = 5) and a second call is measured: peak RSS during it minus the RSS before it, the
activations, not the weights. glibc's ``MALLOC_MMAP_THRESHOLD_`` is fixed at 64 KiB, so every large tensor is mapped
and unmapped and RSS follows the live memory. Two sizes check that the memory grows with the latent
area (flash-style SDPA on the CPU keeps attention linear in it). CPU float32 activations are about twice the
GPU's float16 ones; the RATIOS between families are what the estimate uses. Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("sd15", "animatediff", "zeroscope")


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(family: str, frames: int, size: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from gpu_check import materialise
    from diffusers import MotionAdapter, UNet2DConditionModel, UNet3DConditionModel, UNetMotionModel

    torch.set_num_threads(threads)
    cpu, h = torch.device("cpu"), size // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768) if family != "zeroscope" else \
            UNet3DConditionModel(cross_attention_dim=1024, attention_head_dim=64)
        adapter = MotionAdapter() if family == "animatediff" else None
    unet = materialise(unet, cpu, torch.float32, 0)
    if adapter is not None:
        unet = UNetMotionModel.from_unet2d(unet, materialise(adapter, cpu, torch.float32, 1)).eval()
    rows = 2 * frames
    if family == "sd15":
        x, ctx = torch.randn(rows, 4, h, h), torch.randn(rows, 77, 768)
    elif family == "animatediff":
        x, ctx = torch.randn(2, 4, frames, h, h), torch.randn(rows, 77, 768)      # text per frame
    else:
        x, ctx = torch.randn(2, 4, frames, h, h), torch.randn(2, 77, 1024)        # text per clip
    t = torch.full((x.shape[0],), 501)
    with torch.inference_mode():
        unet(x, t, encoder_hidden_states=ctx, return_dict=False)          # warm-up: kernel caches, weight reorders
        before = _vm_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        unet(x, t, encoder_hidden_states=ctx, return_dict=False)
        peak = _vm_kib("VmHWM")
    mib = (peak - before) / 1024
    return {"family": family, "rows": rows, "latent": h, "mib": mib, "per_row_pixel_mib": mib / (rows * h * h)}


def run_child(family: str, frames: int, size: int, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", family, "--frames", str(frames), "--size", str(size),
           "--threads", str(threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")       # large blocks are mapped and unmapped: RSS = live
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, nargs="+", default=[256, 384])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=FAMILIES)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.frames, args.size[0], args.threads)))
        return 0
    print(f"one CFG-batched UNet call, {2 * args.frames} latent rows ({args.frames} frames x 2 branches), float32, "
          f"CPU, {args.threads} threads")
    print(f"{'family':<12} {'size':>5} {'working MiB':>12} {'MiB/(row*px)':>13} {'ratio to SD1.5':>15}")
    for size in args.size:
        base = None
        for family in FAMILIES:
            r = run_child(family, args.frames, size, args.threads)
            base = base or r["per_row_pixel_mib"]
            print(f"{family:<12} {size:>5} {r['mib']:>12.1f} {r['per_row_pixel_mib']:>13.5f} "
                  f"{r['per_row_pixel_mib'] / base:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
