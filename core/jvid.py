"""JVID: one reverse diffusion that uses the video or the image denoiser at each step (a mixture of denoisers).

Reynaud et al., "JVID: Joint Video-Image Diffusion for Visual-Quality and Temporal-Consistency in Video
Generation" (seed 004); no public code. Exact steps and defaults: METHODS.md §4, ambiguities resolved per §7.3.

    - P_V(u): the probability of a video-model step, piecewise affine in sampling progress u = i/(N-1) (u = 0 at
      pure noise): 1 before t_v, down to p_e at t_e, then towards p_f (§4.2; the printed formula is
      self-contradictory, this is its consistent reading, J1/J2).
    - The loop (§4.3, paper Eq. 5): strided DDPM on the master (video) schedule; the image model sees the frames as
      a batch and is called at the equal-alpha-bar timestep of its own schedule (§1.4). Entropy reduction (§3.5):
      the step noise mixes a noise shared by all frames (share r_v / r_i) with per-frame noise, and on image steps
      it is scaled by gamma.
    - Temporal latent smoothing (§4.4, paper §3.6) once after sampling: voxels close to the clip's temporal mean
      (normalised distance D < c_s) are replaced by it.

Randomness comes from separate streams (seed + offset): "init" (starting noise), "step" (per-frame step noise),
"shared" (the frame-shared step noise) and "choice" (which model runs), so changing P_V never shifts a noise draw.
Layouts: latents ``[1, 4, F, h, w]`` scaled by 0.18215; timesteps 0..999 of the master (video) schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from .callbacks import NO_CALLBACKS, Callbacks
from .context import video_noise
from .denoisers import Guidance, on_schedule
from .samplers import initial_noise

STREAMS = {"init": 0, "step": 1, "shared": 2, "choice": 3}


@dataclass(frozen=True)
class JVIDParams:
    """The §4.5 knobs with the paper's names. t_v, t_e: progress where the video-only phase ends and where P_V
    reaches p_e; p_e, p_f: P_V at t_e and at the end; gamma: step-noise scale on image steps (1 = off); r_i, r_v: the
    frame-shared share of the step noise on image / video steps; smoothing, c_s: temporal latent smoothing and its
    threshold; gamma_on_all_steps: scale the noise of video steps too (J3 option); steps: DDPM steps N."""
    t_v: float = 0.1
    t_e: float = 0.6
    p_e: float = 0.2
    p_f: float = 0.1
    gamma: float = 1.0
    r_i: float = 0.0
    r_v: float = 0.0
    smoothing: bool = False
    c_s: float = 2.0
    gamma_on_all_steps: bool = False
    steps: int = 50

    def checked(self) -> "JVIDParams":
        """Self, or ValueError naming the knob, its value and the range expected."""
        for name in ("t_v", "t_e", "p_e", "p_f", "r_i", "r_v"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.t_v > self.t_e:
            raise ValueError(f"t_v ({self.t_v}) must not exceed t_e ({self.t_e}): P_V falls from 1 at t_v to p_e at t_e")
        if self.gamma < 0:
            raise ValueError(f"gamma (step-noise scale on image steps) must be >= 0, got {self.gamma}")
        if self.c_s <= 0:
            raise ValueError(f"c_s (smoothing threshold) must be > 0, got {self.c_s}")
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps}")
        return self


PRESETS = {
    "64": JVIDParams(t_v=0.2, t_e=0.7, p_e=0.3, p_f=0.3, gamma=0.02, smoothing=True),
    "128": JVIDParams(t_v=0.4, t_e=0.7, p_e=0.4, p_f=0.1, gamma=0.1, smoothing=True),
    "256": JVIDParams(t_v=0.1, t_e=0.6, p_e=0.2, p_f=0.1, gamma=1.0, smoothing=False),
}
"""Paper Table 6 (METHODS.md §4.5): r_i = r_v = 0 and c_s = 2 in all three. The pack's default is "256"."""


def preset(name: str, **overrides) -> JVIDParams:
    """The named preset with ``overrides`` (None values are ignored), checked. Raises ValueError for an unknown
    preset or an override out of range."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}).checked()


# ------------------------------------------------------------------ model choice
def progress(i: int, n: int) -> float:
    """Sampling progress u_i = i/(N-1) of step i of N (0 at the first step; J2)."""
    return i / (n - 1) if n > 1 else 0.0


def p_video(u: float, params: JVIDParams) -> float:
    """P_V(u), the probability that step u (sampling progress 0..1) uses the video model (METHODS.md §4.2)."""
    if u < params.t_v:
        return 1.0
    if u < params.t_e:
        return 1.0 + (u - params.t_v) / (params.t_e - params.t_v) * (params.p_e - 1.0)
    if params.t_e >= 1.0:
        return params.p_e
    return params.p_e + (u - params.t_e) / (1.0 - params.t_e) * (params.p_f - params.p_e)


def choose_models(params: JVIDParams, seed: int) -> list:
    """True (video) / False (image) for each of the N steps: ``U_i < P_V(u_i)`` with ``U_i`` from stream "choice"
    only, so the choices never depend on the noise draws (and vice versa)."""
    n = int(params.steps)
    draws = torch.rand(n, generator=torch.Generator("cpu").manual_seed(int(seed) + STREAMS["choice"]),
                       dtype=torch.float64)
    return [bool(draws[i] < p_video(progress(i, n), params)) for i in range(n)]


def expected_video_steps(params: JVIDParams) -> float:
    """Expected number of video-model steps, sum_i P_V(u_i) (23.0 of 50 for preset 256, 34.5 for 128)."""
    n = int(params.steps)
    return sum(p_video(progress(i, n), params) for i in range(n))


# ------------------------------------------------------------------ the mixture loop
def ddpm_step(schedule, s: torch.Tensor, eps: torch.Tensor, t: int, t_prev: Optional[int], z: torch.Tensor,
              k: float = 1.0) -> torch.Tensor:
    """One strided DDPM step from t to t_prev (None = the end, alpha-bar 1) with noise ``k * sigma * z``:
    a = ab(t)/ab(t_prev), b = 1 - a, mu = (s - b/sqrt(1 - ab(t)) eps)/sqrt(a), sigma^2 = b (1 - ab(t_prev))/(1 - ab(t))
    (DDPM posterior, "fixed_small" variance; METHODS.md §4.3). Float32, shape of ``s``."""
    ab_t = schedule.alpha_bar(t).to(s.device)
    ab_prev = torch.ones_like(ab_t) if t_prev is None else schedule.alpha_bar(t_prev).to(s.device)
    a = ab_t / ab_prev
    b = 1.0 - a
    mu = (s.float() - b / (1.0 - ab_t).sqrt() * eps.float()) / a.sqrt()
    sigma = (b * (1.0 - ab_prev) / (1.0 - ab_t)).clamp(min=0).sqrt()
    return mu + k * sigma * z.to(s.device)


def step_noise(shape: Sequence[int], r: float, step_gen: torch.Generator, shared_gen: torch.Generator) -> torch.Tensor:
    """``sqrt(r) n_sh + sqrt(1 - r) n_f``: n_f ``[1, 4, F, h, w]`` from the "step" stream, n_sh ``[1, 4, 1, h, w]``
    (one draw for all frames) from the "shared" stream. Both are drawn every step whatever r is, so the streams never
    shift. Unit variance per element; frames are correlated by r."""
    n_f = torch.randn(tuple(shape), generator=step_gen, dtype=torch.float32)
    n_sh = torch.randn((shape[0], shape[1], 1, *shape[3:]), generator=shared_gen, dtype=torch.float32)
    return r ** 0.5 * n_sh + (1.0 - r) ** 0.5 * n_f


def jvid_sample(image_denoiser, video_denoiser, shape: Sequence[int], image_guidance: Guidance,
                video_guidance: Guidance, seed: int, params: JVIDParams = PRESETS["256"], *,
                device: Optional[torch.device] = None, exact_mapping: bool = False,
                callbacks: Callbacks = NO_CALLBACKS, on_step=None) -> tuple:
    """The JVID mixture-of-denoisers sampler (METHODS.md §4.3) from pure noise to a clean latent.

    image_denoiser: kind "image" (frames as a batch), driven on the video model's schedule through the equal-alpha-bar
    timestep mapping (nearest integer; ``exact_mapping``: interpolated float timesteps). video_denoiser: kind
    "video", its schedule is the master. shape: ``[1, 4, F, h, w]``. Guidance per model (its own text encoder).
    Grid: N = ``params.steps`` leading timesteps of the master schedule (981 ... 1 for 50); the last step goes to
    alpha-bar 1. ``on_step(i, t, used_video)`` is called after each step. Smoothing (``params.smoothing``) runs once at
    the end. Returns ``(latent [1, 4, F, h, w] float32, [True if the video model ran, per step])``.
    Raises ValueError for mismatched denoiser kinds or out-of-range parameters.
    """
    params = params.checked()
    if image_denoiser.kind != "image" or video_denoiser.kind != "video":
        raise ValueError(f"JVID needs an image and a video denoiser, got {image_denoiser.kind!r} and "
                         f"{video_denoiser.kind!r}")
    master = video_denoiser.schedule
    image = on_schedule(image_denoiser, master, exact=exact_mapping)
    grid = master.timesteps(int(params.steps), "leading")
    used = choose_models(params, seed)
    s = video_noise(video_denoiser, initial_noise(shape, int(seed) + STREAMS["init"]), seed).to(device or "cpu")
    step_gen = torch.Generator("cpu").manual_seed(int(seed) + STREAMS["step"])
    shared_gen = torch.Generator("cpu").manual_seed(int(seed) + STREAMS["shared"])
    for i, t in enumerate(grid):
        callbacks.check()
        video = used[i]
        eps = video_denoiser(s, t, video_guidance, step=i) if video else image(s, t, image_guidance, step=i)
        r, k = (params.r_v, params.gamma if params.gamma_on_all_steps else 1.0) if video else (params.r_i, params.gamma)
        z = step_noise(s.shape, r, step_gen, shared_gen)
        t_prev = grid[i + 1] if i + 1 < len(grid) else None
        x0 = master.predict_x0(s, eps, t)
        s = ddpm_step(master, s, eps, t, t_prev, z, k)
        callbacks.step(x0)
        if on_step is not None:
            on_step(i, t, video)
    if params.smoothing:
        s = temporal_latent_smoothing(s, params.c_s)
    return s, used


# ------------------------------------------------------------------ smoothing
def temporal_latent_smoothing(s: torch.Tensor, c_s: float = 2.0) -> torch.Tensor:
    """Temporal latent smoothing (METHODS.md §4.4, paper §3.6) of ``s`` ``[B, C, F, h, w]`` (any latent scaling: the
    distance is normalised). mu = mean over frames; sigma[b, c] = population std over (h, w) of mu (>= 1e-6);
    D[b, f, h, w] = sum_c |s - mu| / sigma; every voxel (all channels) with D < c_s becomes mu, the others are kept
    exactly. Raises ValueError for c_s <= 0 or a tensor that is not 5-D."""
    if c_s <= 0:
        raise ValueError(f"c_s (smoothing threshold) must be > 0, got {c_s}")
    if s.dim() != 5:
        raise ValueError(f"temporal smoothing needs a video latent [B, C, F, h, w], got shape {tuple(s.shape)}")
    x = s.float()
    mu = x.mean(dim=2, keepdim=True)                                               # [B, C, 1, h, w]
    sigma = mu.std(dim=(-2, -1), unbiased=False, keepdim=True).clamp(min=1e-6)     # [B, C, 1, 1, 1]
    d = ((x - mu).abs() / sigma).sum(dim=1, keepdim=True)                           # [B, 1, F, h, w]
    return torch.where(d < c_s, mu.expand_as(x), x)
