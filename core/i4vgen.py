"""I4VGen: text-to-video through an anchor image, with noise-invariant video score distillation (NI-VSDS).

Guo et al., "I4VGen: Image as Free Stepping Stone for Text-to-Video Generation" (seed 003); official code
xiefan-guo/i4vgen, ``i4vgen/animatediff/pipelines/pipeline_animation.py``. Exact stages and defaults: METHODS.md §3,
official-code quirks §7.2, weight-free scorer §6.2.

    1. Candidates: N_c images from the image model (DDIM, CFG), all in one frame batch; a scorer picks the anchor
       (paper Eqs. 3-4). An anchor picture given by the user skips this stage.
    2. Static video: the anchor latent repeated F times; NI-VSDS moves it with the video model's score at the first
       n_it grid timesteps, one closed-form update each, with ONE noise draw for all of them.
    3. Regeneration: SDEdit of the NI-VSDS video with the video model from the p_re point of its grid.

Layouts: latents ``[1, 4, F, h, w]`` float32 scaled by 0.18215 (candidates are the frames of ``[1, 4, N_c, h, w]``);
pixels are ComfyUI IMAGE ``[N, H, W, 3]`` in 0..1. Timesteps are integers 0..999 of the model that is called.
Each stage draws its noise from its own stream (``seed + STREAMS[name]``), so changing one stage never shifts
another's noise; "regen" has offset 0, the stream ``VBVideoDenoise`` uses for SDEdit, so a staged graph with one seed
equals the one-box node.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .callbacks import NO_CALLBACKS, Callbacks
from .context import video_noise
from .denoisers import Guidance
from .samplers import ddim_sample, initial_noise, sdedit
from .schedule import ANIMATEDIFF_SCHEDULER_CONFIG, NoiseSchedule

log = logging.getLogger(__name__)

STREAMS = {"regen": 0, "cand": 1, "nivsds": 2, "score": 3}
"""Noise streams: seed + offset (METHODS.md §3.1, §7.2 I10)."""

SCORERS = ("auto", "weight-free", "clip", "imagereward", "first")
"""Anchor scorers: ``auto`` = ImageReward weights if on disk, else a full CLIP model if on disk, else the weight-free
diffusion-classifier score (METHODS.md §6.2); ``first`` keeps candidate 0 (the paper's w/o-selection ablation)."""

SCORE_TIMESTEPS = (200, 400, 600, 800)
OFFICIAL_STEP_SIZES = (10.0, 10.0, 10.0, 1.0)


@dataclass(frozen=True)
class I4VGenParams:
    """I4VGen settings (METHODS.md §3.5, AnimateDiff column).

    steps: DDIM steps N of every stage (25); cfg: guidance of every stage (7.5); num_candidates: N_c (16);
    p_ni: share of the grid NI-VSDS runs over, n_it = floor(N p_ni) + 1 (0.6 -> 16 updates at 961..361);
    p_re: share of the grid regeneration re-runs (1.0 -> re-noise at 961, 25 steps);
    step_sizes: NI-VSDS step sizes eta_i, the last one repeating (10, 10, 10, 1 as the official code);
    nivsds_cfg: guidance inside NI-VSDS (None = cfg; METHODS §7.2 I5).
    Parity options (off by default): official_candidate_schedule samples the candidates on AnimateDiff's linear
    schedule with the official DDIM config (§7.2 I1); official_scheduler_config runs NI-VSDS and regeneration with the
    official ``DDIMScheduler(beta_start, beta_end, "linear")`` defaults: grid 960, 920, ..., 0 (steps_offset 0) and
    x0 clipped to [-1, 1] (clip_sample); candidate_index forces the anchor (-1 = the scorer's choice).
    """
    steps: int = 25
    cfg: float = 7.5
    num_candidates: int = 16
    p_ni: float = 0.6
    p_re: float = 1.0
    step_sizes: tuple = OFFICIAL_STEP_SIZES
    nivsds_cfg: Optional[float] = None
    official_candidate_schedule: bool = False
    official_scheduler_config: bool = False
    candidate_index: int = -1

    def checked(self) -> "I4VGenParams":
        """Self, after validation. Raises ValueError naming the parameter, the value and the expected range."""
        for name in ("p_ni", "p_re"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        if int(self.num_candidates) != self.num_candidates or self.num_candidates < 1:
            raise ValueError(f"num_candidates must be at least 1, got {self.num_candidates}")
        if not self.step_sizes or any(not math.isfinite(s) or s <= 0 for s in self.step_sizes):
            raise ValueError(f"step_sizes must be one or more positive numbers, got {list(self.step_sizes)}")
        if self.cfg < 1.0 or (self.nivsds_cfg is not None and self.nivsds_cfg < 1.0):
            raise ValueError(f"cfg must be >= 1, got {self.cfg} (NI-VSDS: {self.nivsds_cfg})")
        if self.candidate_index >= self.num_candidates:
            raise ValueError(f"candidate_index {self.candidate_index} is not one of the {self.num_candidates} "
                             f"candidates (0..{self.num_candidates - 1}, or -1 for the scorer's choice)")
        return self


def parse_step_sizes(text: str) -> tuple:
    """``"10, 10, 10, 1"`` -> (10.0, 10.0, 10.0, 1.0). Raises ValueError naming ``step_sizes`` for bad text."""
    try:
        sizes = tuple(float(s) for s in str(text).replace(";", ",").split(",") if s.strip())
    except ValueError:
        raise ValueError(f"step_sizes: expected comma-separated positive numbers such as '10, 10, 10, 1', "
                         f"got {text!r}") from None
    if not sizes or any(not math.isfinite(s) or s <= 0 for s in sizes):
        raise ValueError(f"step_sizes: expected comma-separated positive numbers such as '10, 10, 10, 1', got {text!r}")
    return sizes


def stream_noise(shape: Sequence[int], seed: int, stream: str) -> torch.Tensor:
    """One draw of ``shape`` float32 on the CPU from stream ``stream`` ("nivsds": the constant NI-VSDS noise,
    i.i.d. per frame; "regen": the regeneration noise)."""
    return initial_noise(shape, int(seed) + STREAMS[stream])


# ------------------------------------------------------------------ schedules and grids
def official_schedule(schedule: Optional[NoiseSchedule] = None) -> NoiseSchedule:
    """The scheduler of the official AnimateDiff I4VGen code: ``DDIMScheduler(beta_start=0.00085, beta_end=0.012,
    beta_schedule="linear")`` with diffusers' defaults, i.e. steps_offset 0 (grid 960, 920, ..., 0 for N = 25),
    alpha-bar final 1 and x0 clipped to [-1, 1] (configs/animatediff_configs/inference/inference-v2.yaml,
    scripts/animate_animatediff.py). ``schedule`` gives the alpha-bar table (default AnimateDiff's)."""
    base = schedule or NoiseSchedule.from_config(ANIMATEDIFF_SCHEDULER_CONFIG)
    return dataclasses.replace(base, steps_offset=0, final_alpha_cumprod=1.0, clip_sample=1.0)


def with_schedule(denoiser, schedule: NoiseSchedule):
    """A shallow copy of ``denoiser`` that runs on ``schedule`` (same UNet, no mapping): the official code's image
    model is the plain SD UNet sampled on the video model's linear schedule (METHODS.md §7.2 I1)."""
    other = copy.copy(denoiser)
    other.schedule = schedule
    return other


def nivsds_iterations(steps: int, p_ni: float) -> int:
    """n_it = floor(N p_ni) + 1, at most N (official ``int(num_inference_steps * p_ni_vsds) + 1``; METHODS §3.3)."""
    return min(int(steps * p_ni + 1e-9) + 1, int(steps))


def eta_schedule(step_sizes: Sequence[float], n: int) -> list:
    """The step size of each of ``n`` NI-VSDS updates: ``step_sizes`` with its last value repeated."""
    sizes = [float(s) for s in step_sizes]
    return (sizes + [sizes[-1]] * n)[:n]


# ------------------------------------------------------------------ stage 1: candidates and selection
def candidate_noise(seed: int, num_candidates: int, latent_hw: Sequence[int]) -> torch.Tensor:
    """Initial noise of the candidates ``[1, 4, N_c, h, w]`` float32 on the CPU, stream "cand": one draw of
    ``[1, 4, 1, h, w]`` per candidate from one generator, so candidate n's noise does not depend on N_c."""
    g = torch.Generator("cpu").manual_seed(int(seed) + STREAMS["cand"])
    h, w = latent_hw
    return torch.cat([torch.randn((1, 4, 1, h, w), generator=g) for _ in range(int(num_candidates))], dim=2)


def generate_candidates(image_denoiser, noise: torch.Tensor, timesteps: Sequence[int], guidance: Guidance, *,
                        callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """Stage 1 (paper Eq. 3): every candidate is one frame of a frame-wise DDIM run of the image model, so all N_c
    candidates and both CFG branches go through the UNet in one batch per step (chunked by the denoiser's
    ``frame_batch_size``). noise ``[1, 4, N_c, h, w]``; returns the clean candidate latents, same shape, float32."""
    if image_denoiser.kind != "image":
        raise ValueError("candidates are generated by the image model (a frame-wise denoiser)")
    return ddim_sample(image_denoiser, noise, timesteps, guidance, callbacks=callbacks)


def diffusion_alignment(image_denoiser, latents: torch.Tensor, text, null, seed: int,
                        timesteps: Sequence[int] = SCORE_TIMESTEPS, callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """Diffusion-classifier text alignment of each candidate (METHODS.md §6.2, MODELS.md §9.1):
    ``d_n = mean_t [ mean||eps_t - eps(x, t, null)||^2 - mean||eps_t - eps(x, t, text)||^2 ]`` with
    ``x = q(x0_n, t, eps_t)``, one noise eps_t per timestep SHARED by all candidates (stream "score"), one batched
    [null, text] call per timestep. Higher means the prompt explains the image better.

    latents ``[1, 4, N, h, w]`` clean candidate latents; text/null: ``Branch``es of the prompt and negative prompt.
    Returns ``[N]`` float32 on the CPU.
    """
    from dataclasses import replace

    g = torch.Generator("cpu").manual_seed(int(seed) + STREAMS["score"])
    n, (h, w) = latents.shape[2], latents.shape[-2:]
    guidance = Guidance([replace(null, role="uncond"), replace(text, role="cond")], [0.0, 1.0], combine=False)
    d = torch.zeros(n)
    for t in timesteps:
        callbacks.check()
        eps = torch.randn((1, 4, 1, h, w), generator=g).to(latents.device).expand_as(latents)
        x = image_denoiser.schedule.add_noise(latents, eps, t)
        e = image_denoiser(x, t, guidance)                                # [2, 4, N, h, w]
        err = ((e - eps) ** 2).mean(dim=(1, 3, 4)).cpu()                  # [2, N]
        d += err[0] - err[1]
        callbacks.step(None)
    return d / len(timesteps)


def _luma(images: torch.Tensor) -> torch.Tensor:
    return 0.299 * images[..., 0] + 0.587 * images[..., 1] + 0.114 * images[..., 2]


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Variance of the 3x3 Laplacian of luma per image (METHODS.md §6.2). images ``[N, H, W, 3]`` in 0..1 -> [N]."""
    y = _luma(images.float().cpu())[:, None]
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return F.conv2d(y, k).flatten(1).var(dim=1, unbiased=False)


def exposure(images: torch.Tensor) -> torch.Tensor:
    """Fraction of pixels whose luma is below 0.02 or above 0.98, per image. ``[N, H, W, 3]`` -> [N]."""
    y = _luma(images.float().cpu())
    return ((y < 0.02) | (y > 0.98)).float().flatten(1).mean(dim=1)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    sd = x.std(unbiased=False)
    return (x - x.mean()) / sd if sd > 1e-12 else torch.zeros_like(x)


def weight_free_scores(alignment: torch.Tensor, images: torch.Tensor) -> dict:
    """The weight-free anchor score (METHODS.md §6.2; weights 0.2, 2, 0.05 are project choices):
    ``score = z(d) + 0.2 z(log(S + 1e-8)) - 2 max(0, E - 0.05)`` with z standardising over the candidates.
    alignment ``[N]`` (``diffusion_alignment``), images ``[N, H, W, 3]`` in 0..1. Returns a dict of [N] tensors:
    score, alignment, sharpness, exposure."""
    s, e = sharpness(images), exposure(images)
    score = _standardise(alignment.float()) + 0.2 * _standardise(torch.log(s + 1e-8)) - 2.0 * (e - 0.05).clamp(min=0)
    return {"score": score, "alignment": alignment.float(), "sharpness": s, "exposure": e}


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's image preprocessing: shorter side resized to ``size`` (bicubic, antialiased), centre crop, OpenAI
    mean/std. images ``[N, H, W, 3]`` in 0..1 -> ``[N, 3, size, size]`` float32."""
    x = images.float().permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    s = size / min(h, w)
    x = F.interpolate(x, size=(max(size, int(h * s)), max(size, int(w * s))), mode="bicubic", antialias=True,
                      align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean.to(x)) / std.to(x)


def clip_scores(model, tokenizer, prompt: str, images: torch.Tensor) -> dict:
    """CLIP text-image cosine similarity of each candidate with the prompt (MODELS.md §9.4; the CLIP scorer of
    I4VGen's selection when a whole CLIP model is on disk). model: transformers ``CLIPModel``; tokenizer: the CLIP
    BPE tokenizer (SD1's); images ``[N, H, W, 3]`` in 0..1. Returns {"score": [N] cosine} on the CPU."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    context = model.text_model.embeddings.position_embedding.weight.shape[0]
    ids = tokenizer([prompt], padding="max_length", max_length=context, truncation=True, return_tensors="pt").input_ids
    text = model.text_projection(model.text_model(input_ids=ids.to(device)).pooler_output)
    pixels = clip_pixels(images, model.config.vision_config.image_size).to(device, dtype)
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    cos = F.cosine_similarity(image.float(), text.float(), dim=-1)
    return {"score": cos.cpu()}


def choose(scores: torch.Tensor, forced: int = -1) -> int:
    """Index of the best candidate (ties -> lowest index), or ``forced`` when it is >= 0."""
    if forced >= 0:
        if forced >= scores.numel():
            raise ValueError(f"candidate_index {forced} is not one of the {scores.numel()} candidates")
        return int(forced)
    best = scores.max()
    return int((scores == best).nonzero()[0])


# ------------------------------------------------------------------ stage 2: static video and NI-VSDS
def static_video(anchor: torch.Tensor, frames: int) -> torch.Tensor:
    """The anchor latent ``[1, 4, 1, h, w]`` repeated ``frames`` times along frames -> ``[1, 4, F, h, w]``."""
    if anchor.dim() != 5 or anchor.shape[2] != 1:
        raise ValueError(f"anchor: expected one latent frame [1, 4, 1, h, w], got shape {tuple(anchor.shape)}")
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    return anchor.expand(-1, -1, int(frames), -1, -1).clone()


def ni_vsds(video_denoiser, z: torch.Tensor, noise: torch.Tensor, timesteps: Sequence[int], guidance: Guidance,
            step_sizes: Sequence[float] = OFFICIAL_STEP_SIZES, *, callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """Noise-invariant video score distillation (METHODS.md §3.3; official pipeline_animation.py, stage 2-1).

    For each t_i of ``timesteps`` (high to low noise): ``x = q(z, t_i, noise)``, then
    ``z <- z - eta_i (1 - ab(t_i)) (eps_g(x, t_i) - noise)``: score distillation with the UNet Jacobian and the
    sqrt(ab) factor dropped, weight w(t) = 1 - ab(t), closed form (no autograd). ``noise`` ``[1, 4, F, h, w]`` is
    drawn once and used at every step ("noise-invariant"); eta_i from ``step_sizes`` (last value repeats).
    One (CFG-batched) video-model call per update. z: ``[1, 4, F, h, w]`` clean latent; returns the optimised clean
    latent, float32.
    """
    if video_denoiser.kind != "video":
        raise ValueError("NI-VSDS needs the video model")
    if noise.shape != z.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from the latent's {tuple(z.shape)}")
    sched = video_denoiser.schedule
    z, noise = z.float(), noise.to(z.device, torch.float32)
    for i, (t, eta) in enumerate(zip(timesteps, eta_schedule(step_sizes, len(timesteps)))):
        callbacks.check()
        eps = video_denoiser(sched.add_noise(z, noise, t), t, guidance, step=i)
        grad = (1.0 - sched.alpha_bar(t).to(z.device)) * (eps - noise)     # w(t) (eps_hat - eps_c), official order
        z = z - eta * grad
        callbacks.step(z)
    return z


# ------------------------------------------------------------------ stage 3: regeneration
def regenerate(video_denoiser, z: torch.Tensor, noise: torch.Tensor, timesteps: Sequence[int], guidance: Guidance, *,
               callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """Stage 3 (METHODS.md §3.4): ``x = q(z, tau_start, noise)``, then DDIM with the video model to the end.
    z, noise ``[1, 4, F, h, w]``; returns the clean video latent, float32."""
    return sdedit(video_denoiser, z, timesteps, guidance, noise, callbacks=callbacks)


# ------------------------------------------------------------------ the whole method
@dataclass
class I4VGenResult:
    """What ``i4vgen`` returns: the video ``[1, 4, F, h, w]``, the anchor ``[1, 4, 1, h, w]``, the NI-VSDS video,
    the candidates ``[1, 4, N_c, h, w]`` (None with a given anchor), their scores (None likewise) and the index."""
    video: torch.Tensor
    anchor: torch.Tensor
    ni_vsds: torch.Tensor
    candidates: Optional[torch.Tensor]
    scores: Optional[dict]
    index: int


def candidate_stage(image_denoiser, params: I4VGenParams) -> tuple:
    """``(denoiser, grid)`` of stage 1: the image model on its own schedule, or, with
    ``official_candidate_schedule``, on the official AnimateDiff DDIM config (grid 960, ..., 0)."""
    den = with_schedule(image_denoiser, official_schedule()) if params.official_candidate_schedule else image_denoiser
    return den, den.schedule.timesteps(params.steps, "leading")


def video_stages(video_denoiser, params: I4VGenParams) -> tuple:
    """``(denoiser, NI-VSDS grid, regeneration grid)`` of stages 2-3: the first ``nivsds_iterations`` timesteps of
    the N-step grid, and its last ``min(floor(N p_re), N)`` (official ``get_timesteps(N, strength=p_re)``; p_re = 1
    starts at 961, 960 official). ``official_scheduler_config`` swaps in the official DDIM config."""
    den = with_schedule(video_denoiser, official_schedule(video_denoiser.schedule)) \
        if params.official_scheduler_config else video_denoiser
    grid = den.schedule.timesteps(params.steps, "leading")
    return den, grid[:nivsds_iterations(params.steps, params.p_ni)], \
        den.schedule.timesteps(params.steps, "leading", strength=params.p_re)


def unet_calls(params: I4VGenParams, with_candidates: bool = True) -> dict:
    """UNet calls per stage, all CFG-batched: candidates N (one call for all N_c), scoring 4 (weight-free scorer),
    NI-VSDS n_it, regeneration N_re. The minimum the algorithm needs (METHODS.md §3.5 "Cost")."""
    return {"candidates": params.steps if with_candidates else 0,
            "score": len(SCORE_TIMESTEPS) if with_candidates else 0,
            "ni_vsds": nivsds_iterations(params.steps, params.p_ni),
            "regeneration": max(1, min(int(params.steps * params.p_re + 1e-9), params.steps))}


def i4vgen(image_denoiser, video_denoiser, shape: Sequence[int], image_guidance: Guidance, video_guidance: Guidance,
           seed: int, params: I4VGenParams, *, score: Optional[Callable[[torch.Tensor], dict]] = None,
           anchor: Optional[torch.Tensor] = None, device=None, nivsds_guidance: Optional[Guidance] = None,
           callbacks: Callbacks = NO_CALLBACKS, on_stage: Optional[Callable[[str, object], None]] = None) -> I4VGenResult:
    """Run I4VGen end to end (METHODS.md §3; official pipeline_animation.py ``__call__``).

    shape: ``(1, 4, F, h, w)`` of the video. score: maps the candidate latents ``[1, 4, N_c, h, w]`` to a dict with
    a ``"score"`` tensor [N_c] (higher is better; the node decodes and runs the chosen scorer); None keeps candidate 0
    (the ``first`` scorer). anchor: a given clean anchor latent ``[1, 4, 1, h, w]`` (real-image mode) that skips
    stage 1. nivsds_guidance: the guidance inside NI-VSDS (default ``video_guidance``). on_stage(name, value) is
    called after each stage ("candidates", "anchor", "ni_vsds") for previews and logs.
    Raises ValueError for bad params or an anchor of another size.
    """
    params.checked()
    b, c, frames, h, w = shape
    video, grid_ni, grid_re = video_stages(video_denoiser, params)
    device = device or "cpu"
    candidates, scores = None, None
    if anchor is None:
        image, grid = candidate_stage(image_denoiser, params)
        noise = candidate_noise(seed, params.num_candidates, (h, w)).to(device)
        candidates = generate_candidates(image, noise, grid, image_guidance, callbacks=callbacks)
        if on_stage:
            on_stage("candidates", candidates)
        scores = score(candidates) if score is not None and params.candidate_index < 0 else None
        index = choose(scores["score"], params.candidate_index) if scores else max(params.candidate_index, 0)
        anchor = candidates[:, :, index:index + 1]
        log.info("I4VGen anchor: candidate %d of %d%s", index, params.num_candidates,
                 f" (scores {[round(float(s), 4) for s in scores['score']]})" if scores else "")
    else:
        index = -1
        if tuple(anchor.shape[-2:]) != (h, w) or anchor.dim() != 5 or anchor.shape[2] != 1:
            raise ValueError(f"anchor: its latent is {tuple(anchor.shape)} (one frame of {anchor.shape[-1] * 8}x"
                             f"{anchor.shape[-2] * 8} pixels), but the video is {w * 8}x{h * 8}; resize the anchor "
                             "image or set width/height to match")
    anchor = anchor.to(device, torch.float32)
    if on_stage:
        on_stage("anchor", anchor)
    z = static_video(anchor, frames)
    z = ni_vsds(video, z, video_noise(video, stream_noise(z.shape, seed, "nivsds"), seed).to(device), grid_ni,
                nivsds_guidance or video_guidance, params.step_sizes, callbacks=callbacks)
    if on_stage:
        on_stage("ni_vsds", z)
    out = regenerate(video, z, video_noise(video, stream_noise(z.shape, seed, "regen"), seed).to(device), grid_re,
                     video_guidance, callbacks=callbacks)
    return I4VGenResult(out, anchor, z, candidates, scores, index)
