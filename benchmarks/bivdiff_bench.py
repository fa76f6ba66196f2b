#!/usr/bin/env python3
"""BIVDiff (ControlNet task): our batched core against a hand-composed, official-style diffusers baseline.

Run:  python3 benchmarks/bivdiff_bench.py [--frames 8] [--size 32] [--steps 10] [--repeats 3]

Both sides run in ONE process on the SAME tiny random-weight modules (``tests/core/tiny.py``: the "sd15tiny"
UNet2DConditionModel, a tiny ControlNetModel, a tiny AutoencoderKL and a tiny UNet3DConditionModel standing in for
ZeroScope), with the same seeded initial noise, the same control hints and the same text embeddings (random
``[1, 77, 32]`` tensors made once, outside the timed region, for the SD1.5 prompt/negative and the VDM
prompt/negative). Grid: the SD1.5/ZeroScope DDIM grid ("leading" + offset 1, e.g. 901, 801, ..., 1 for 10 steps)
everywhere; CFG 7.5 for the frame-wise ControlNet stage and for the smoothing; inversions use the negative ("")
embedding with no CFG (METHODS.md §2.3); VAE encodes take the posterior mean (METHODS.md §7.1 B8).

(A) ours, the way the VideoBridge nodes call ``core/`` (nodes/bivdiff.py):
    1. ``bivdiff.framewise_generate`` with ``UNet2DDenoiser(controlnet=...)`` and ``bivdiff.idm_guidance(
       "controlnet", ...)``: every frame and both CFG branches go through ONE ControlNet + ONE UNet call per step
       (batch 2F);
    2. ``core.latents.decode_video`` + ``encode_video`` (frame chunks of 8): Z0 = E(D(z));
    3. ``bivdiff.mixed_inversion``: image inversion with the UNet2D (frames as one batch, one call per step); at
       alpha = 1 the video inversion has weight 0 and is skipped (METHODS.md §7.1 B7); at alpha = 0.5 it runs;
    4. ``bivdiff.temporal_smoothing`` with ``VideoDenoiser`` over the UNet3D, CFG 7.5 as one [uncond, cond] call;
    5. ``decode_video``.
    It is timed at alpha = 1 (the ControlNet default) and at alpha = 0.5 (both inversions run: the same model
    work as the baseline, so that ratio isolates what batching alone buys).

(B) the baseline, composed from diffusers the way the official MCG-NJU/BIVDiff code runs (inference.py,
    models/ControlNet/infer.py, models/mixed_inversion.py, models/video_smoothing.py):
    1. ONE ``StableDiffusionControlNetPipeline`` call PER FRAME (pipeline built from the same modules, DDIMScheduler
       from the SD1.5 config, no safety checker; tiny tokenizer/text encoder built in code, never used because
       ``prompt_embeds``/``negative_prompt_embeds`` are passed); frame f starts from slice f of the same noise;
       the pipeline batches [uncond, cond] of that one frame (ControlNet + UNet, batch 2);
    2. decode and re-encode frame by frame (the official code decodes inside each pipeline call and encodes with
       VAE slicing on);
    3. BOTH inversions, always, interleaved in one plain loop as the official ``MixedInversionPipeline`` does:
       ``DDIMInverseScheduler`` steps, the UNet2D over all frames as one batch (the official code uses its inflated
       UNet on the whole clip; METHODS.md §7.1 B11 explains why a per-frame UNet is the faithful image model) and
       the UNet3D over the clip, no CFG; then alpha * z_img + (1 - alpha) * z_vid;
    4. smoothing: a plain ``DDIMScheduler`` loop with the UNet3D, [uncond, cond] batched in one call per step as the
       official ``VideoSmoothingPipeline`` does;
    5. decode frame by frame (VAE slicing).

Equal work: same frames, size, steps, grid, CFG, noise, hints, embeddings and modules; both sides produce the same
latents up to float rounding (the script prints the max abs difference of the intermediate and final latents,
also at alpha = 0.5 where the mixing path is used). The only differences are HOW the work is issued (per-frame
pipeline calls vs one batched call per step; per-frame vs chunked VAE) and that the baseline always runs the video
inversion, which at alpha = 1 has weight 0 (B7).

Printed per side: model forward calls per stage (forward pre-hooks on the UNet2D, ControlNet, UNet3D and VAE
encoder/decoder; "rows" is the batch size summed over calls: images for 2-D models, clips for the UNet3D), wall time
(median of ``--repeats`` runs after one warm-up run per side, ``time.perf_counter``, sides interleaved), per-stage
median times, and peak memory:
  * CPU: each side runs in a fresh subprocess (same setup); after setup and one warm-up run the kernel's peak-RSS
    counter is reset (``/proc/self/clear_refs`` = 5; if that is not allowed, ``ru_maxrss`` is used instead and
    the figure is the growth of the process's lifetime peak), then one run; the figure is peak RSS during that run
    minus RSS before it, i.e. the run's working memory above the loaded models (activations, allocator caches).
  * CUDA: ``torch.cuda.max_memory_allocated`` during one run minus the memory allocated before it.
Timings are printed, never asserted.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _register_pack() -> None:
    """Import the repository root as the package ``videobridge`` (as tests/conftest.py does), without running its
    ComfyUI entry point."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    if "videobridge" not in sys.modules:
        spec = importlib.util.spec_from_file_location("videobridge", os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        sys.modules["videobridge"] = importlib.util.module_from_spec(spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")        # no torchvision notices on import


_register_pack()

import torch  # noqa: E402
from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionControlNetPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from einops import rearrange  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from tests.core import tiny  # noqa: E402
from videobridge.core import bivdiff  # noqa: E402
from videobridge.core.denoisers import Branch, UNet2DDenoiser, VideoDenoiser, cfg, single  # noqa: E402
from videobridge.core.latents import decode_video, encode_video, vae_scale  # noqa: E402
from videobridge.core.samplers import initial_noise  # noqa: E402
from videobridge.core.schedule import SD15_SCHEDULER_CONFIG, NoiseSchedule  # noqa: E402

CFG = 7.5
STAGES = ("1 frame-wise IDM", "2 VAE decode+encode", "3 mixed inversion", "4 smoothing", "5 VAE decode")
COUNTED = ("unet2d", "controlnet", "unet3d", "vae.encoder", "vae.decoder")


# ------------------------------------------------------------------ setup (outside every timed region)
@dataclass
class Bench:
    unet: torch.nn.Module
    controlnet: torch.nn.Module
    vae: torch.nn.Module
    unet3d: torch.nn.Module
    pipe: StableDiffusionControlNetPipeline
    schedule: NoiseSchedule
    grid: list
    steps: int
    noise: torch.Tensor        # [1, 4, F, h, w]
    hints: torch.Tensor        # [F, 3, H, W] in 0..1
    sd_text: torch.Tensor      # [1, 77, 32] "CLIP-L" prompt
    sd_null: torch.Tensor      # [1, 77, 32] "CLIP-L" negative ""
    vid_text: torch.Tensor     # [1, 77, 32] "OpenCLIP-H" prompt (tiny width)
    vid_null: torch.Tensor     # [1, 77, 32] "OpenCLIP-H" negative ""
    device: torch.device

    @property
    def frames(self) -> int:
        return self.noise.shape[2]

    @property
    def size(self) -> int:
        return self.hints.shape[-1]


def tiny_text_stack():
    """A tiny CLIP tokenizer and text encoder built in code: the pipeline wants the objects, but it never runs
    them here because the embeddings are passed in."""
    words = ["a", "video", "frame"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{w + "</w>": i + 2 for i, w in enumerate(words)}}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                           num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    return tokenizer, encoder


def make_pipeline(unet, controlnet, vae, device) -> StableDiffusionControlNetPipeline:
    tokenizer, text_encoder = tiny_text_stack()
    pipe = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text_encoder.to(device), tokenizer=tokenizer, unet=unet, controlnet=controlnet,
        scheduler=DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build(frames: int, size: int, steps: int, device: torch.device) -> Bench:
    if size % 8:
        raise SystemExit(f"--size must be a multiple of 8, got {size}")
    unet, controlnet = tiny.unet2d(0).to(device), tiny.controlnet(1).to(device)
    vae, unet3d = tiny.vae(2).to(device), tiny.unet3d(3).to(device)
    schedule = NoiseSchedule.sd15()
    grid = schedule.timesteps(steps)
    diffusers_grid = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    diffusers_grid.set_timesteps(steps)
    if diffusers_grid.timesteps.tolist() != grid:                       # same grid on both sides, or no benchmark
        raise SystemExit(f"grid mismatch: ours {grid} vs diffusers {diffusers_grid.timesteps.tolist()}")
    g = torch.Generator().manual_seed(5)
    return Bench(unet=unet, controlnet=controlnet, vae=vae, unet3d=unet3d,
                 pipe=make_pipeline(unet, controlnet, vae, device), schedule=schedule, grid=grid, steps=steps,
                 noise=initial_noise((1, 4, frames, size // 8, size // 8), seed=0).to(device),
                 hints=torch.rand(frames, 3, size, size, generator=g).to(device),
                 sd_text=tiny.text(10).to(device), sd_null=tiny.text(11).to(device),
                 vid_text=tiny.text(12).to(device), vid_null=tiny.text(13).to(device), device=device)


# ------------------------------------------------------------------ counting and stage timing
class Recorder:
    """Attributes forward calls (pre-hooks) and wall time to the stage set by ``mark``."""

    def __init__(self, b: Bench):
        self.sync = torch.cuda.synchronize if b.device.type == "cuda" else (lambda: None)
        self.calls, self.rows, self.times = defaultdict(int), defaultdict(int), defaultdict(float)
        self.stage, self._t0 = None, 0.0
        modules = {"unet2d": b.unet, "controlnet": b.controlnet, "unet3d": b.unet3d,
                   "vae.encoder": b.vae.encoder, "vae.decoder": b.vae.decoder}
        self._handles = [m.register_forward_pre_hook(self._hook(n), with_kwargs=True) for n, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            self.calls[self.stage, name] += 1
            self.rows[self.stage, name] += int(x.shape[0])
        return hook

    def mark(self, stage) -> None:
        self.sync()
        now = time.perf_counter()
        if self.stage is not None:
            self.times[self.stage] += now - self._t0
        self.stage, self._t0 = stage, now

    def close(self) -> None:
        self.mark(None)
        for h in self._handles:
            h.remove()


# ------------------------------------------------------------------ (A) ours: core/bivdiff.py as the nodes use it
def run_ours(b: Bench, alpha: float, mark) -> dict:
    mark(STAGES[0])
    idm = UNet2DDenoiser(b.unet, b.schedule, controlnet=b.controlnet)
    guidance = bivdiff.idm_guidance("controlnet", b.sd_text, b.sd_null, cfg_scale=CFG, control=b.hints)
    z_idm = bivdiff.framewise_generate(idm, b.noise, b.grid, guidance)
    mark(STAGES[1])
    z0 = encode_video(b.vae, decode_video(b.vae, z_idm))
    mark(STAGES[2])
    video_denoiser = VideoDenoiser(b.unet3d, b.schedule)
    z_t = bivdiff.mixed_inversion(z0, b.grid, alpha, image_denoiser=UNet2DDenoiser(b.unet, b.schedule),
                                  video_denoiser=video_denoiser, image_guidance=single(Branch(b.sd_null)),
                                  video_guidance=single(Branch(b.vid_null)))
    mark(STAGES[3])
    z = bivdiff.temporal_smoothing(video_denoiser, z_t, b.grid, cfg(Branch(b.vid_text), Branch(b.vid_null), CFG))
    mark(STAGES[4])
    video = decode_video(b.vae, z)
    return {"idm": z_idm, "z0": z0, "zT": z_t, "final": z, "video": video}


# ------------------------------------------------------------------ (B) baseline: official-style diffusers
def baseline_framewise(b: Bench) -> torch.Tensor:
    """One ControlNet pipeline call per frame (models/ControlNet/infer.py), [uncond, cond] batched per frame."""
    size = b.size
    latents = [b.pipe(prompt_embeds=b.sd_text, negative_prompt_embeds=b.sd_null, image=b.hints[f:f + 1],
                      height=size, width=size, num_inference_steps=b.steps, guidance_scale=CFG,
                      latents=b.noise[:, :, f], output_type="latent", return_dict=False)[0]
               for f in range(b.frames)]
    return torch.stack(latents, dim=2)


def baseline_vae_roundtrip(b: Bench, z: torch.Tensor) -> torch.Tensor:
    """Decode then re-encode frame by frame (pipeline decode per frame; encode with VAE slicing)."""
    s = vae_scale(b.vae)
    pixels = [b.vae.decode(z[:, :, f] / s).sample.clamp(-1, 1) for f in range(b.frames)]
    return torch.stack([b.vae.encode(x).latent_dist.mean * s for x in pixels], dim=2)


def baseline_mixed_inversion(b: Bench, z0: torch.Tensor, alpha: float) -> torch.Tensor:
    """Both DDIM inversions, interleaved in one loop as in the official MixedInversionPipeline; no CFG."""
    inverse = DDIMInverseScheduler.from_config(SD15_SCHEDULER_CONFIG)
    inverse.set_timesteps(b.steps)
    n = b.frames
    ctx = b.sd_null.expand(n, -1, -1)
    z_img = z_vid = z0
    for t in inverse.timesteps:
        eps = b.unet(rearrange(z_img, "b c f h w -> (b f) c h w"), t, encoder_hidden_states=ctx).sample
        z_img = inverse.step(rearrange(eps, "(b f) c h w -> b c f h w", f=n), t, z_img).prev_sample
        eps = b.unet3d(z_vid, t, encoder_hidden_states=b.vid_null).sample
        z_vid = inverse.step(eps, t, z_vid).prev_sample
    return alpha * z_img + (1 - alpha) * z_vid


def baseline_smoothing(b: Bench, z_t: torch.Tensor) -> torch.Tensor:
    """Plain DDIM loop with the UNet3D, [uncond, cond] in one call per step (official VideoSmoothingPipeline)."""
    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(b.steps)
    ctx = torch.cat([b.vid_null, b.vid_text])
    x = z_t
    for t in scheduler.timesteps:
        eps_u, eps_c = b.unet3d(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
        x = scheduler.step(eps_u + CFG * (eps_c - eps_u), t, x).prev_sample
    return x


def run_baseline(b: Bench, alpha: float, mark) -> dict:
    mark(STAGES[0])
    z_idm = baseline_framewise(b)
    mark(STAGES[1])
    z0 = baseline_vae_roundtrip(b, z_idm)
    mark(STAGES[2])
    z_t = baseline_mixed_inversion(b, z0, alpha)
    mark(STAGES[3])
    z = baseline_smoothing(b, z_t)
    mark(STAGES[4])
    s = vae_scale(b.vae)
    video = torch.stack([b.vae.decode(z[:, :, f] / s).sample.clamp(-1, 1) for f in range(b.frames)], dim=2)
    return {"idm": z_idm, "z0": z0, "zT": z_t, "final": z, "video": video}


SIDES = {  # name -> (runner, alpha)
    "ours a=1": (run_ours, 1.0),
    "ours a=0.5": (run_ours, 0.5),
    "baseline": (run_baseline, 1.0),
}


# ------------------------------------------------------------------ measuring
def run_once(b: Bench, name: str, alpha: float = None):
    runner, default_alpha = SIDES[name]
    rec = Recorder(b)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = runner(b, default_alpha if alpha is None else alpha, rec.mark)
    rec.close()
    return out, time.perf_counter() - t0, rec


def measure_times(b: Bench, repeats: int):
    """One warm-up run per side (its calls are the reported counts), then ``repeats`` interleaved timed runs."""
    warm = {name: run_once(b, name) for name in SIDES}
    totals, stages = defaultdict(list), defaultdict(lambda: defaultdict(list))
    for _ in range(repeats):
        for name in SIDES:
            _, dt, rec = run_once(b, name)
            totals[name].append(dt)
            for st in STAGES:
                stages[name][st].append(rec.times[st])
    return warm, totals, stages


def _vm_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def memory_child(args) -> None:
    """In a fresh process: setup, warm-up run, reset the peak counter, one run; print the JSON result."""
    b = setup(args)
    name = args.memory_child
    run_once(b, name)
    gc.collect()
    if b.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_once(b, name)
        torch.cuda.synchronize()
        result = {"peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20, "how": "cuda max_memory_allocated"}
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                                   # reset VmHWM to the current RSS
            before = _vm_kib("VmRSS")
            run_once(b, name)
            result = {"peak_mib": (_vm_kib("VmHWM") - before) / 1024, "how": "VmHWM after reset - VmRSS before",
                      "rss_before_mib": before / 1024}
        except OSError:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            run_once(b, name)
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            result = {"peak_mib": (after - before) / 1024, "how": "ru_maxrss delta (lifetime peak growth)"}
    print("MEMORY_JSON " + json.dumps(result))


def measure_memory(args) -> dict:
    out = {}
    for name in SIDES:
        cmd = [sys.executable, os.path.abspath(__file__), "--frames", str(args.frames), "--size", str(args.size),
               "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device,
               "--memory-child", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY_JSON ")]
        out[name] = json.loads(line[-1][12:]) if line else {"peak_mib": float("nan"),
                                                            "how": f"child failed: {proc.stderr[-300:]}"}
    return out


# ------------------------------------------------------------------ report
def max_diff(a: dict, b: dict) -> dict:
    return {k: float((a[k].float() - b[k].float()).abs().max()) for k in ("idm", "z0", "zT", "final")}


def other_cpu_busy(seconds: float = 1.0):
    """Share of all cores busy during ``seconds`` while this process sleeps (from /proc/stat), or None."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]                            # total, idle + iowait
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def print_header(args, b: Bench) -> None:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", open("/proc/cpuinfo").read()).group(1)
    except (OSError, AttributeError):
        pass
    import diffusers
    import transformers
    print(f"BIVDiff ControlNet benchmark  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"device {b.device} | {cpu} | os.cpu_count {os.cpu_count()} | torch threads {torch.get_num_threads()} | "
          f"torch {torch.__version__} | diffusers {diffusers.__version__} | transformers {transformers.__version__}")
    busy = other_cpu_busy()
    if busy is not None and busy > 0.2:
        print(f"WARNING: other processes kept {busy:.0%} of the {os.cpu_count()} cores busy just before the run; "
              "the wall times below are inflated and noisy")
    print(f"frames {args.frames} | size {args.size}x{args.size} (latent {args.size // 8}x{args.size // 8}) | steps "
          f"{args.steps} (grid {b.grid[0]}..{b.grid[-1]}) | CFG {CFG} | repeats {args.repeats} after 1 warm-up")
    print(f"CPU busy with other processes just before the run: {'n/a' if busy is None else f'{busy:.0%}'}")


def print_calls(warm: dict) -> None:
    print("\nModel forward calls per stage, one run: calls (rows = batch items summed: images for 2-D models, clips "
          "for the UNet3D)")
    names = list(warm)
    print(f"{'stage':<22}{'model':<13}" + "".join(f"{n:>18}" for n in names))
    totals = defaultdict(int)
    for st in STAGES:
        for model in COUNTED:
            cells = [(warm[n][2].calls[st, model], warm[n][2].rows[st, model]) for n in names]
            if not any(c for c, _ in cells):
                continue
            print(f"{st:<22}{model:<13}" + "".join(f"{f'{c} ({r})':>18}" for c, r in cells))
    for n in names:
        for (st, model), c in warm[n][2].calls.items():
            if model in ("unet2d", "controlnet", "unet3d"):
                totals[n] += c
    print(f"{'total UNet/ControlNet calls':<35}" + "".join(f"{totals[n]:>18}" for n in names))


def print_times(totals: dict, stages: dict, memory: dict) -> None:
    names = list(totals)
    med = {n: statistics.median(totals[n]) for n in names}
    print("\nWall time, seconds (median; per-stage medians below)")
    print(f"{'':<35}" + "".join(f"{n:>18}" for n in names))
    for st in STAGES:
        print(f"{st:<35}" + "".join(f"{statistics.median(stages[n][st]):>18.3f}" for n in names))
    print(f"{'total (median)':<35}" + "".join(f"{med[n]:>18.3f}" for n in names))
    print(f"{'total (min .. max)':<35}" + "".join(f"{f'{min(totals[n]):.2f}..{max(totals[n]):.2f}':>18}"
                                                 for n in names))
    if memory:
        print(f"{'peak memory of one run, MiB':<35}" + "".join(f"{memory[n]['peak_mib']:>18.1f}" for n in names))
    low = {n: min(totals[n]) for n in names}
    print("\nSpeed-up baseline / ours (median wall time; [fastest runs], the figure least hurt by other load):")
    for label, n in (("equal output  (ours a=1, video inversion skipped)", "ours a=1"),
                     ("equal model work (ours a=0.5, both inversions)   ", "ours a=0.5")):
        print(f"  {label}: {med['baseline'] / med[n]:.2f}x  [{low['baseline'] / low[n]:.2f}x]")
    if memory:
        how = "; ".join(sorted({m["how"] for m in memory.values()}))
        peaks = [memory[n]["peak_mib"] for n in ("baseline", "ours a=1")]
        ratio = f"{peaks[0] / peaks[1]:.2f}x" if min(peaks) >= 1.0 else "n/a (below 1 MiB: negligible at this size)"
        base_rss = [m["rss_before_mib"] for m in memory.values() if "rss_before_mib" in m]
        print(f"  peak memory baseline / ours a=1: {ratio}\n  memory = {how}; one run per side in a fresh "
              "subprocess after a warm-up run" + (f"; process RSS before the run ~{max(base_rss):.0f} MiB"
                                                    if base_rss else ""))


def print_diffs(b: Bench, warm: dict) -> None:
    base_half, _, _ = run_once(b, "baseline", alpha=0.5)
    print("\nSanity: max |ours - baseline| of the latents (float32; scale of the final latent "
          f"{float(warm['baseline'][0]['final'].abs().max()):.2f})")
    for label, ours, base in (("alpha = 1  ", warm["ours a=1"][0], warm["baseline"][0]),
                              ("alpha = 0.5", warm["ours a=0.5"][0], base_half)):
        d = max_diff(ours, base)
        print(f"  {label}: " + "  ".join(f"{k} {v:.2e}" for k, v in d.items()))


# ------------------------------------------------------------------ main
def setup(args) -> Bench:
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()
    torch.manual_seed(0)
    return build(args.frames, args.size, args.steps, torch.device(args.device))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="frame width = height in pixels (multiple of 8)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-child", choices=list(SIDES), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    t_start = time.perf_counter()
    b = setup(args)
    print_header(args, b)
    warm, totals, stages = measure_times(b, args.repeats)
    memory = {} if args.no_memory else measure_memory(args)
    print_calls(warm)
    print_times(totals, stages, memory)
    print_diffs(b, warm)
    busy = other_cpu_busy()
    print(f"\nscript wall time {time.perf_counter() - t_start:.0f} s; CPU busy with other processes at the end: "
          f"{'n/a' if busy is None else f'{busy:.0%}'}")


if __name__ == "__main__":
    main()
