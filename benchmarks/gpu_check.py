#!/usr/bin/env python3
"""GPU check: peak memory and time per stage of every method with full-size random-weight models, at 16 and 64
frames of 512x512 (64 frames on context windows of 16, overlap 4).

Run on a machine with a CUDA GPU:  python3 benchmarks/gpu_check.py [--frames 16 64] [--size 512] [--steps 4]
Smoke run anywhere (tiny models, CPU; checks the script itself):  python3 benchmarks/gpu_check.py --smoke

Models (random weights, fp16 on the GPU, built from diffusers' default configs on the meta device, so nothing is
downloaded): SD1.5 UNet2DConditionModel, a ControlNet and a T2I-Adapter (canny) on it, AnimateDiff v2 (MotionAdapter defaults) on that UNet
with per-frame motion norms and shared spatial modules, and a ZeroScope-sized UNet3DConditionModel (OpenCLIP-H text
width 1024). Text embeddings are random. Each stage runs the pack's core functions exactly as the nodes call them,
with ``--steps`` steps (the per-step memory is what matters; time scales with the steps) and CFG batched:

  BIVDiff   frame-wise ControlNet / T2I-Adapter generation, Prompt2Prompt editing (inversion + two-prompt edit with
            LocalBlend) -> image-model DDIM inversion -> smoothing with AnimateDiff / ZeroScope
  EVS       T2I SDEdit with the encapsulated T2V block (AnimateDiff)
  I4VGen    16 candidates -> NI-VSDS -> regeneration (AnimateDiff)
  JVID      the mixture sampler (SD1.5 + AnimateDiff)

For each stage it prints the peak allocated memory (``torch.cuda.max_memory_allocated``, weights included) and the
wall time; the target is 16x512^2 within 24 GB for every method, and 64x512^2 within 24 GB with windows. Image-model
frames run in chunks of ``--frame-batch`` (8). Timings are printed, never asserted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tests.conftest  # noqa: E402,F401  (registers the package as ``videobridge``)
from videobridge.core import bivdiff, evs, i4vgen, jvid  # noqa: E402
from videobridge.core import prompt2prompt as P2P  # noqa: E402
from videobridge.core.context import ContextWindows, windowed  # noqa: E402
from videobridge.core.denoisers import Branch, UNet2DDenoiser, VideoDenoiser, cfg, on_schedule, single  # noqa: E402
from videobridge.core.models import ImageModel, build_animatediff  # noqa: E402
from videobridge.core.samplers import ddim_invert, initial_noise  # noqa: E402
from videobridge.core.schedule import NoiseSchedule  # noqa: E402

GIB = 1024 ** 3


def materialise(module, device, dtype, seed):
    """Random weights (N(0, 0.02), norms 1) for a module built on the meta device."""
    module = module.to_empty(device=device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
    return module.to(dtype).eval().requires_grad_(False)


def build(device, dtype, smoke):
    from diffusers import ControlNetModel, MotionAdapter, T2IAdapter, UNet2DConditionModel, UNet3DConditionModel

    if smoke:
        from tests.core import tiny
        unet, cn, u3 = tiny.unet2d(0), tiny.controlnet(0), tiny.unet3d(0)
        adapter = tiny.randomize(MotionAdapter(**tiny.MOTION), 1)
        t2i = tiny.randomize(T2IAdapter(channels=list(tiny.CH), num_res_blocks=2, adapter_type="full_adapter"), 2)
        dims = (32, 32)
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel(cross_attention_dim=768)
            cn = ControlNetModel(cross_attention_dim=768)
            adapter = MotionAdapter()
            u3 = UNet3DConditionModel(cross_attention_dim=1024, attention_head_dim=64)
            t2i = T2IAdapter(in_channels=1, adapter_type="full_adapter")             # canny / sketch
        unet, cn, adapter, u3, t2i = (materialise(m, device, dtype, k)
                                      for k, m in enumerate((unet, cn, adapter, u3, t2i)))
        dims = (768, 1024)
    unet, cn, u3, t2i = unet.to(device, dtype), cn.to(device, dtype), u3.to(device, dtype), t2i.to(device, dtype)
    image = ImageModel(unet, None, None, None, NoiseSchedule.sd15(), "base", "random weights")
    motion = build_animatediff(image, adapter.to(device, dtype), "v2").unet   # as VBLoadVideoModel: shared modules
    return unet, cn, t2i, motion, u3, dims


def measure(name, fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = f"{torch.cuda.max_memory_allocated() / GIB:7.2f} GiB"
    else:
        peak = "    n/a (CPU)"
    print(f"  {name:<52} {peak}  {time.perf_counter() - t0:8.2f} s")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--frame-batch", type=int, default=8)
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU, 8 and 20 frames at 64x64")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    if args.smoke:
        args.frames, args.size, args.steps = [8, 20], 64, 2
    sd, ad = NoiseSchedule.sd15(), NoiseSchedule.animatediff()
    unet, cn, t2i, motion, u3, (d_clip, d_open) = build(device, dtype, args.smoke)
    t_i, n_i = torch.randn(1, 77, d_clip, device=device), torch.randn(1, 77, d_clip, device=device)
    t_e = torch.randn(1, 77, d_clip, device=device)                     # the Prompt2Prompt edit prompt
    t_z, n_z = torch.randn(1, 77, d_open, device=device), torch.randn(1, 77, d_open, device=device)
    print(f"device {device}, {dtype}, {args.size}x{args.size}, {args.steps} steps per stage")
    with torch.inference_mode():
        for frames in args.frames:
            h = args.size // 8
            ctx = ContextWindows(8 if args.smoke else 16, 2 if args.smoke else 4) if frames > 16 else None
            print(f"\n{frames} frames" + (f", context windows {ctx.context_length}/{ctx.context_overlap}" if ctx else ""))
            image = UNet2DDenoiser(unet, sd, frame_batch_size=args.frame_batch)
            image_cn = UNet2DDenoiser(unet, sd, controlnet=cn, frame_batch_size=args.frame_batch)
            video = windowed(VideoDenoiser(motion, ad), ctx)
            zero = windowed(VideoDenoiser(u3, sd), ctx)
            shape = (1, 4, frames, h, h)
            hints = torch.rand(frames, 3, args.size, args.size, device=device)
            g_cn = cfg(Branch(t_i, control=hints), Branch(n_i, control=hints), 7.5)
            g_i, g_v, g_z = cfg(Branch(t_i), Branch(n_i), 7.5), cfg(Branch(t_i), Branch(n_i), 7.5), \
                cfg(Branch(t_z), Branch(n_z), 7.5)
            grid_i, grid_v = sd.timesteps(args.steps), ad.timesteps(args.steps)
            noise = initial_noise(shape, 0).to(device)
            z = measure("BIVDiff 1 frame-wise ControlNet", lambda: bivdiff.framewise_generate(
                image_cn, noise, grid_i, g_cn), device)
            measure("BIVDiff 1 frame-wise T2I-Adapter", lambda: bivdiff.framewise_generate(
                UNet2DDenoiser(unet, sd, controlnet=t2i, frame_batch_size=args.frame_batch), noise, grid_i, g_cn),
                device)
            blend = torch.zeros(2, 77)
            blend[:, 2] = 1                                            # the swapped word at token 2 of both prompts
            edit = P2P.Prompt2PromptEdit("replace", int(0.4 * (args.steps + 1)), int(0.4 * args.steps),
                                         mapper=torch.eye(77), blend_tokens=blend)
            measure("BIVDiff 1 Prompt2Prompt (invert + edit, LocalBlend)", lambda: P2P.invert_and_edit(
                image, z, grid_i, edit, P2P.pair_guidance(t_i, t_e, n_i, 7.5, z.shape[2]), single(Branch(n_i))),
                device)
            inv = measure("BIVDiff 2 image inversion (AnimateDiff grid)", lambda: ddim_invert(
                on_schedule(image, ad), z, grid_v, single(Branch(n_i))), device)
            measure("BIVDiff 3 smoothing, AnimateDiff", lambda: bivdiff.temporal_smoothing(video, inv, grid_v, g_v),
                    device)
            measure("BIVDiff 3 smoothing, ZeroScope", lambda: bivdiff.temporal_smoothing(
                zero, inv, grid_i, g_z), device)
            params = evs.EVSParams(t2i_steps=max(args.steps * 5, 10), t2v_steps=8, t2v_spacing="trailing", n_V=2)
            measure("EVS refine (SDEdit block)", lambda: evs.evs_refine(image, video, z, g_i,
                                                                        cfg(Branch(t_i), Branch(n_i), 1.0), 0,
                                                                        params), device)
            ip = i4vgen.I4VGenParams(steps=args.steps, num_candidates=min(16, frames))
            measure("I4VGen (candidates, NI-VSDS, regeneration)", lambda: i4vgen.i4vgen(
                image, video, shape, g_i, g_v, 0, ip, device=device), device)
            measure("JVID preset 256", lambda: jvid.jvid_sample(image, video, shape, g_i, g_v, 0,
                                                                jvid.preset("256", steps=args.steps),
                                                                device=device), device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
