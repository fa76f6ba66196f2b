#!/usr/bin/env python3
"""Context windows: peak memory and time of one guided video-model step on 16, 48 and 96 frames, with and without
windows, on the CPU.

Run:  python3 benchmarks/context_bench.py [--frames 16 48 96] [--size 256] [--repeats 3] [--threads 2]

One video-model evaluation as every sampler step makes it: the tiny "sd15tiny" AnimateDiff UNet (``tests/core/
tiny.py``: UNetMotionModel with per-frame motion norms, random weights; position encodings for 128 frames, so that
the whole-clip baseline can run at all: AnimateDiff v2 itself has 32) at ``--size`` pixels (latents size/8), CFG 7.5
as one [uncond, cond] batch, through ``core.denoisers.VideoDenoiser`` (whole clip) or ``core.context.
WindowedDenoiser`` (ComfyUI's defaults: windows of 16 frames overlapping by 4, standard_static, pyramid fusion).
Each configuration runs in a fresh subprocess; right before the first call the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs`` = 5) and the figure is the peak RSS during that call minus the RSS before it: working
memory above the loaded model and inputs (activations), not the process total (measuring after a warm-up call would
miss memory the allocator keeps). Time: median of ``--repeats`` further calls.
The tiny model's activations scale with frames x size like the real one's; absolute values are far smaller.
Timings are printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(frames: int, size: int, windows: bool, repeats: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, ROOT)
    import tests.conftest  # noqa: F401  (registers the package as ``videobridge``)
    from tests.core import tiny
    from videobridge.core.context import ContextWindows, WindowedDenoiser
    from videobridge.core.denoisers import Branch, VideoDenoiser, cfg
    from videobridge.core.models import use_per_frame_motion_norm
    from videobridge.core.schedule import NoiseSchedule

    torch.set_num_threads(threads)
    from diffusers import MotionAdapter, UNetMotionModel

    adapter = tiny.randomize(MotionAdapter(**dict(tiny.MOTION, motion_max_seq_length=128)), 1)   # 96 frames fit
    unet = UNetMotionModel.from_unet2d(tiny.unet2d(0), adapter).eval()
    use_per_frame_motion_norm(unet)
    den = VideoDenoiser(unet, NoiseSchedule.animatediff())
    if windows:
        den = WindowedDenoiser(den, ContextWindows())
    x = torch.randn(1, 4, frames, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    g = cfg(Branch(tiny.text(1)), Branch(tiny.text(2)), 7.5)
    with torch.inference_mode():
        before = _vm_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        den(x, 501, g)                                   # the first call: its peak is the working memory
        peak = _vm_kib("VmHWM")
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            den(x, 501, g)
            times.append(time.perf_counter() - t0)
    return {"time": statistics.median(times), "peak_mib": (peak - before) / 1024, "calls": den.calls}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 48, 96])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("FRAMES", "WINDOWS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.size, args.child[1] == "1", args.repeats, args.threads)))
        return 0
    print(f"One CFG step of the tiny AnimateDiff UNet at {args.size}x{args.size} px, {args.threads} threads; "
          f"windows: 16 frames, overlap 4, pyramid")
    print(f"{'frames':>6}  {'whole clip: s':>14} {'MiB':>8}   {'windows: s':>11} {'MiB':>8} {'UNet calls':>10}   "
          f"{'memory ratio':>12} {'time ratio':>10}")
    for n in args.frames:
        res = {}
        for w in (0, 1):
            out = subprocess.run([sys.executable, __file__, "--child", str(n), str(w), "--size", str(args.size),
                                  "--repeats", str(args.repeats), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            res[w] = json.loads(out.stdout.strip().splitlines()[-1])
        a, b = res[0], res[1]
        calls = b["calls"] // (args.repeats + 1)                        # UNet calls per step with windows
        print(f"{n:>6}  {a['time']:>14.3f} {a['peak_mib']:>8.0f}   {b['time']:>11.3f} {b['peak_mib']:>8.0f} "
              f"{calls:>10}   {b['peak_mib'] / max(a['peak_mib'], 1e-9):>12.2f} {b['time'] / a['time']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
