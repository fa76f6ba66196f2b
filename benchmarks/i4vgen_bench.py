#!/usr/bin/env python3
"""I4VGen (VBI4VGen's core): UNet calls per stage against the minimum, wall time per stage, and the ratio against
the official pipeline's loops and a one-candidate-per-call structure on identical tiny models.

Run:  python3 benchmarks/i4vgen_bench.py [--frames 16] [--size 64] [--steps 25] [--repeats 3]

N_c = frames, as in the official code (its candidates are the frames of one clip's noise).

One process, the same tiny random-weight modules for every run (``tests/core/tiny.py``: the "sd15tiny"
UNet2DConditionModel as the image model and a UNetMotionModel built on it with per-frame motion norms as AnimateDiff),
the same random text embeddings and seed, CFG 7.5 everywhere, the METHODS.md §3.5 defaults (p_ni 0.6 -> 16 NI-VSDS
updates, p_re 1.0 -> 25 regeneration steps). The weight-free scorer needs decoded images; the benchmark scores with
random stand-in "images" of the latent size so that no VAE is timed.

Compared, all producing the same latents (the max abs difference is printed):
  (A) ours: ``core.i4vgen.i4vgen`` with both parity options, all N_c candidates and both CFG branches in one UNet
      call per step; with the weight-free scorer, and with a forced index (then it is the official computation);
  (B) the official loops (``tests/core/test_i4vgen.official_pipeline``, pipeline_animation.py transcribed): the
      same batching as (A) (the official code folds the candidates into the batch too);
  (C) one candidate per call: stage 1 as N_c separate DDIM runs of batch 2 (how a per-image text-to-image pipeline
      would make the candidates), stages 2-3 as in (B).
Printed: UNet forward calls and rows (batch entries) per stage next to the minimum (N image calls for all
candidates, 4 scoring calls, n_it + N_re video calls), median wall time per side and stage, and the ratios.
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
from tests.core.test_i4vgen import official_pipeline  # noqa: E402
from videobridge.core import i4vgen  # noqa: E402
from videobridge.core.denoisers import Branch, UNet2DDenoiser, VideoDenoiser, cfg  # noqa: E402
from videobridge.core.models import use_per_frame_motion_norm  # noqa: E402
from videobridge.core.schedule import NoiseSchedule  # noqa: E402


class Counter:
    """Forward calls and rows (batch entries) of a module, by the stage currently set."""

    def __init__(self, module, name):
        self.name, self.stage, self.calls, self.rows = name, None, {}, {}
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls[self.stage] = self.calls.get(self.stage, 0) + 1
        self.rows[self.stage] = self.rows.get(self.stage, 0) + int(args[0].shape[0])

    def reset(self):
        self.calls, self.rows = {}, {}


def one_candidate_per_call(unet, noise, g, uncond, cond, steps):
    """Stage 1 of (C): N_c separate DDIM runs (official scheduler config) of batch 2 each."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear")
    sch.set_timesteps(steps)
    text = torch.cat([uncond, cond])
    out = []
    for n in range(noise.shape[2]):
        x = noise[:, :, n]
        for t in sch.timesteps:
            u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=text).sample.chunk(2)
            x = sch.step(u + g * (c - u), t, x).prev_sample
        out.append(x)
    return torch.cat(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16, help="frames (16: the official motion module needs >= 16)")
    ap.add_argument("--size", type=int, default=64, help="pixel size (latents are size/8)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    F_, h = args.frames, args.size // 8
    args.candidates = F_                     # the official code draws its candidates as the frames of one clip
    unet = tiny.unet2d(0)
    video = tiny.motion_unet(0, unet)
    use_per_frame_motion_norm(video)
    c_img, c_vid = Counter(unet, "image"), Counter(video, "video")
    uncond, cond = tiny.text(1), tiny.text(2)
    g = cfg(Branch(cond), Branch(uncond), 7.5)
    seed, index = 7, 3
    params = i4vgen.I4VGenParams(steps=args.steps, num_candidates=args.candidates, official_candidate_schedule=True,
                                 official_scheduler_config=True)
    noise = i4vgen.candidate_noise(seed, args.candidates, (h, h))
    eps_c = i4vgen.stream_noise((1, 4, F_, h, h), seed, "nivsds")
    eps_r = i4vgen.stream_noise((1, 4, F_, h, h), seed, "regen")
    params_forced = i4vgen.I4VGenParams(steps=args.steps, num_candidates=args.candidates, candidate_index=index,
                                        official_candidate_schedule=True, official_scheduler_config=True)
    fake_images = torch.rand(args.candidates, h, h, 3, generator=torch.Generator().manual_seed(0))

    def ours(scored=True):
        def score(lat):
            c_img.stage = "score"
            d = i4vgen.diffusion_alignment(UNet2DDenoiser(unet, NoiseSchedule.sd15()), lat, Branch(cond),
                                           Branch(uncond), seed)
            c_img.stage = "candidates"
            return i4vgen.weight_free_scores(d, fake_images)

        stages = {}

        def mark(name, _):
            stages[name] = time.perf_counter()
            c_vid.stage = "ni_vsds" if name == "anchor" else "regeneration"

        c_img.stage = "candidates"
        t0 = time.perf_counter()
        p = params if scored else params_forced
        res = i4vgen.i4vgen(UNet2DDenoiser(unet, NoiseSchedule.sd15()), VideoDenoiser(video, NoiseSchedule.animatediff()),
                            (1, 4, F_, h, h), g, g, seed, p, score=score, on_stage=mark)
        t1 = time.perf_counter()
        return res, {"1 candidates + score": stages["anchor"] - t0, "2 NI-VSDS": stages["ni_vsds"] - stages["anchor"],
                     "3 regeneration": t1 - stages["ni_vsds"], "total": t1 - t0}

    def official(per_candidate=False):
        """(B) the official loops; (C) the same with stage 1 as one candidate per call."""
        t0 = time.perf_counter()
        cand = one_candidate_per_call(unet, noise, 7.5, uncond, cond, args.steps) if per_candidate else None
        t1 = time.perf_counter()
        out = official_pipeline(unet, video, uncond, cond, noise, index, F_, steps=args.steps, constant_noise=eps_c,
                                regen_noise=eps_r, candidates=cand)
        t2 = time.perf_counter()
        return out, {"candidates per call": t1 - t0, "total": t2 - t0} if per_candidate else {"total": t2 - t0}

    with torch.inference_mode():
        for c in (c_img, c_vid):
            c.reset()
        res, _ = ours()
        print(f"I4VGen benchmark: {F_} frames, {args.size}x{args.size} px, N = {args.steps}, N_c = {args.candidates}, "
              f"{args.threads} threads; anchor = candidate {res.index} (weight-free scorer)")
        calls = i4vgen.unet_calls(params)
        print("\nUNet calls per stage (ours)     calls  rows   minimum")
        for stage, counter in [("candidates", c_img), ("score", c_img), ("ni_vsds", c_vid), ("regeneration", c_vid)]:
            print(f"  {stage:<28} {counter.calls.get(stage, 0):>5} {counter.rows.get(stage, 0):>5}   "
                  f"{calls[stage]:>5}")
        # equality with the official loops (forced index, as the official code has no weight-free scorer)
        forced = ours(scored=False)[0]
        ref = official_pipeline(unet, video, uncond, cond, noise, index, F_, steps=args.steps, constant_noise=eps_c,
                                regen_noise=eps_r)
        print(f"\nmax |ours - official| (forced candidate {index}): candidates "
              f"{(forced.candidates[0].permute(1, 0, 2, 3) - ref[0]).abs().max():.2e}, NI-VSDS "
              f"{(forced.ni_vsds - ref[1]).abs().max():.2e}, video {(forced.video - ref[2]).abs().max():.2e}")
        per = one_candidate_per_call(unet, noise, 7.5, uncond, cond, args.steps)
        print(f"one candidate per call vs batched candidates: max abs {(per - ref[0]).abs().max():.2e}, relative "
              f"{float((per - ref[0]).norm() / ref[0].norm()):.2e} (batch size changes fp32 rounding; 25 steps of "
              "CFG 7.5 on random weights amplify it)")

        times = {"ours": [], "ours, forced": [], "official": [], "per-candidate": []}
        ours(), official(), official(True)                               # warm-up
        for _ in range(args.repeats):
            times["ours"].append(ours()[1])
            times["ours, forced"].append(ours(scored=False)[1])
            times["official"].append(official()[1])
            times["per-candidate"].append(official(True)[1])
    print(f"\nwall time, median of {args.repeats}")
    for side, runs in times.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"  {side:<14} " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()))
    m = {k: statistics.median(r["total"] for r in v) for k, v in times.items()}
    cand_ours = statistics.median(r["1 candidates + score"] for r in times["ours"])
    cand_per = statistics.median(r["candidates per call"] for r in times["per-candidate"])
    print(f"\nratio official loops / ours with a forced index (equal work, equal output): "
          f"{m['official'] / m['ours, forced']:.2f}x; the weight-free scorer adds "
          f"{m['ours'] / m['ours, forced'] - 1:.0%} to ours")
    print(f"ratio one-candidate-per-call / ours, whole method: {m['per-candidate'] / m['ours']:.2f}x; "
          f"stage 1 alone (ours incl. 4 scoring calls): {cand_per / cand_ours:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
