"""EVS: T2I + [T2V] + T2I, a text-to-video block encapsulated inside text-to-image denoising.

Su et al., "Encapsulated Composition of Text-to-Image and Text-to-Video Models for High-Quality Video Synthesis",
CVPR 2025 (seed 002); no public code. Exact steps and defaults: METHODS.md §5, ambiguities resolved per §7.4.

    1. SDEdit noising of the source video with the T2I model: x = q_I(z0, t1, eps), t1 = tau^I_{T1-k1} (Eq. 1).
    2. T2I DDIM from t1 down to t_T2V; there the T2I prediction gives zI = x0_hat_I (the bridge: each model
       re-noises a clean latent on its own schedule, so no timestep mapping is needed).
    3. The [T2V] block turns zI into a temporally consistent clean zIV: SDEdit with the video model from t_V for n_V
       evaluations (Eq. 9, default), or DDIM inversion of zI up to t_V with Q/K/V captured on chosen decoder
       self-attention layers, then denoising with Selective Feature Injection (Eq. 11).
    4. Re-noise x = q_I(zIV, t_T2V, eps_r) (Eq. 10; eps_r = the initial eps by default), re-evaluate the T2I model
       at t_T2V and finish the T2I DDIM loop.

Layouts: latents ``[1, 4, F, h, w]`` scaled by 0.18215; pixels ``[1, 3, F, H, W]`` in -1..1. Timesteps are integers
0..999 of the model they belong to (t1, t_T2V on the T2I grid; t_V on the T2V grid). The T2I frames may be
chunked (the image denoiser's ``frame_batch_size``); the video model sees the whole clip.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .attention import AttentionController, FeatureBank, SFI_PRESETS, check_budget, check_gamma
from .callbacks import NO_CALLBACKS, Callbacks
from .context import video_noise
from .denoisers import Guidance
from .samplers import ddim_invert, ddim_sample, initial_noise, predict_clean

log = logging.getLogger(__name__)

BLOCK_MODES = ("sdedit", "inversion_sfi")
RENOISE = ("initial", "fresh")
STREAMS = {"sdedit": 0, "t2v": 1, "renoise": 2}
"""Noise streams: seed + offset (METHODS.md §5.1)."""


@dataclass(frozen=True)
class EVSParams:
    """The §5.4 hyperparameters with their paper names.

    t2i_steps (T1): T2I DDIM grid size (leading grid, 981..1 for 50). s1: T2I noising strength (0.4 -> t1 = 381).
    t_T2V: T2I timestep where the T2V block is encapsulated (on the T2I grid, below t1). t2v_steps (T_V): T2V grid
    size; t2v_spacing: its grid ("trailing" for Lightning: 999, 874, ..., 124; "leading" for DDIM models). t_V: T2V timestep the block starts from (on the T2V
    grid). n_V: T2V evaluations in the block. block: "sdedit" or "inversion_sfi". renoise: eps_r, "initial" or
    "fresh". sfi_layers: preset name or explicit layer list; sfi_gamma: Eq. 11 blend; fixed_point_iters: extra
    evaluations per inversion step; bank_dtype/bank_device: where captured features live; bank_budget_gib: the
    largest bank allowed (0 = no limit).
    """
    t2i_steps: int = 50
    s1: float = 0.4
    t_T2V: int = 201
    t2v_steps: int = 8
    t2v_spacing: str = "trailing"
    t_V: int = 499
    n_V: int = 4
    block: str = "sdedit"
    renoise: str = "initial"
    sfi_layers: object = "shallow"
    sfi_gamma: float = SFI_PRESETS["shallow"][1]
    fixed_point_iters: int = 0
    bank_dtype: torch.dtype = torch.float16
    bank_device: str = "cpu"
    bank_budget_gib: float = 8.0


# ------------------------------------------------------------------ grids and input
def t2i_grid(schedule, steps: int, s1: float) -> list:
    """The T2I SDEdit grid: the last ``floor(s1 * steps)`` timesteps of the leading grid (50, 0.4 -> 381, ..., 1).
    Raises ValueError for s1 outside (0, 1] or a strength that keeps no step."""
    if not 0.0 < s1 <= 1.0:
        raise ValueError(f"s1 (T2I noising strength) must be in (0, 1], got {s1}")
    if int(steps * s1 + 1e-9) < 1:
        raise ValueError(f"s1 = {s1} with {steps} T2I steps keeps no step; raise s1 or the steps")
    return schedule.timesteps(steps, "leading", s1)


def split_at(grid: Sequence[int], t_T2V: int) -> tuple:
    """(steps before t_T2V, steps from t_T2V on). Raises ValueError unless t_T2V is on the T2I grid below its
    first timestep (the block needs at least one T2I step before it)."""
    grid = list(grid)
    if t_T2V not in grid[1:]:
        raise ValueError(f"t_T2V = {t_T2V} is not a timestep of the T2I grid after its first step; choose one of "
                         f"{grid[1:]}")
    i = grid.index(t_T2V)
    return grid[:i], grid[i:]


def t2v_grid(schedule, steps: int, spacing: str, t_V: int, n_V: int) -> list:
    """The T2V grid from t_V to its end (the inversion target and the block's sampling steps come from it).
    Raises ValueError unless t_V is on the grid and n_V (>= 1) evaluations fit after it."""
    full = schedule.timesteps(steps, spacing)
    if t_V not in full:
        raise ValueError(f"t_V = {t_V} is not a timestep of the {steps}-step {spacing} T2V grid; choose one of "
                         f"{full}")
    rest = full[full.index(t_V):]
    if not 1 <= n_V <= len(rest):
        raise ValueError(f"n_V = {n_V} T2V evaluations from t_V = {t_V}: must be in 1..{len(rest)} ({rest})")
    return rest


def upscale_pixels(pixels: torch.Tensor, factor: float) -> torch.Tensor:
    """Resize ``[1, 3, F, H, W]`` pixels (-1..1) by ``factor`` in pixel space, bicubic with antialiasing, to sizes
    rounded down to multiples of 8 (METHODS.md §5.1; paper §4.1 uses 2.0). Raises ValueError for factor <= 0 or a
    result smaller than 8 px."""
    if factor <= 0:
        raise ValueError(f"upscale must be > 0, got {factor}")
    H, W = pixels.shape[-2:]
    h, w = int(H * factor) // 8 * 8, int(W * factor) // 8 * 8
    if h < 8 or w < 8:
        raise ValueError(f"upscale {factor} turns {W}x{H} into less than 8 px; use a larger factor")
    if (h, w) == (H, W):
        return pixels
    frames = pixels[0].transpose(0, 1)                                                # [F, 3, H, W]
    out = F.interpolate(frames.float(), size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(-1, 1).transpose(0, 1)[None]


# ------------------------------------------------------------------ selective feature injection
def sfi_invert(video_denoiser, z0: torch.Tensor, grid: Sequence[int], guidance: Guidance, layers,
               capture_timesteps: Sequence[int], *, fixed_point_iters: int = 0, bank_dtype=torch.float16,
               bank_device="cpu", callbacks: Callbacks = NO_CALLBACKS) -> tuple:
    """DDIM inversion of ``z0`` up to ``grid[0]`` (§1.6) that captures Q/K/V of ``layers`` at
    ``capture_timesteps`` (the steps that will be injected; EVS §3.3 SFI step 1-2). With fixed-point iterations the
    last iterate's features stay. Returns ``(z_T, FeatureBank)``."""
    layers = video_denoiser.attention_layers(layers)
    bank = FeatureBank(z0.shape[2], tuple(z0.shape[-2:]), video_denoiser.schedule, bank_dtype, bank_device)
    ctl = AttentionController(layers, bank, "capture", capture_timesteps)
    with video_denoiser.controlled(ctl):
        z = ddim_invert(video_denoiser, z0, grid, guidance, fixed_point_iters=fixed_point_iters, callbacks=callbacks)
    log.info("captured %r", bank)
    return z, bank


def injecting(video_denoiser, bank: FeatureBank, layers, gamma: float):
    """Context manager: the denoiser's ``layers`` compute Eq. 11 from ``bank`` at every timestep the bank holds
    (``sfi_attention``); other calls run unchanged. Restores the processors on exit."""
    return video_denoiser.controlled(AttentionController(video_denoiser.attention_layers(layers), bank,
                                                         "inject", gamma=gamma))


# ------------------------------------------------------------------ the [T2V] block (§5.3)
def denoise_to_x0(video_denoiser, y: torch.Tensor, steps: Sequence[int], guidance: Guidance, *,
                  callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """n = len(steps) T2V evaluations from ``y`` at ``steps[0]``: DDIM between them, and the clean latent predicted by
    the LAST evaluation (METHODS.md §7.4 E4). ``[1, 4, F, h, w]`` float32."""
    steps = list(steps)
    if len(steps) > 1:
        y = ddim_sample(video_denoiser, y, steps[:-1], guidance, end=steps[-1], callbacks=callbacks)
    return predict_clean(video_denoiser, y, steps[-1], guidance, step=len(steps) - 1, callbacks=callbacks)


def t2v_block(video_denoiser, z_i: torch.Tensor, grid_v: Sequence[int], n_V: int, guidance: Guidance, *,
              mode: str = "sdedit", noise: Optional[torch.Tensor] = None, bank: Optional[FeatureBank] = None,
              sfi_layers="shallow", sfi_gamma: float = 0.5, fixed_point_iters: int = 0, bank_dtype=torch.float16,
              bank_device="cpu", callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """The encapsulated [T2V] block: clean latent ``z_i`` in, clean temporally consistent latent out.

    grid_v: the T2V grid from t_V to its end (``t2v_grid``); the block makes n_V evaluations at ``grid_v[:n_V]``.
    mode "sdedit" (Eq. 9): y = q_V(z_i, t_V, noise). mode "inversion_sfi": y = DDIM inversion of z_i up to t_V with
    the video model (§1.6, K = ``fixed_point_iters``), capturing Q/K/V of ``sfi_layers`` at the injected steps;
    the denoising then uses Eq. 11 with ``sfi_gamma``. A given ``bank`` (captured elsewhere) is injected instead of
    capturing one, in either mode. Raises ValueError for an unknown mode, a missing noise tensor in "sdedit", or an
    incompatible bank.
    """
    if mode not in BLOCK_MODES:
        raise ValueError(f"block mode must be one of {BLOCK_MODES}, got {mode!r}")
    steps = list(grid_v[:n_V])
    uses_sfi = bank is not None or mode == "inversion_sfi"
    layers = video_denoiser.attention_layers(sfi_layers) if uses_sfi and sfi_layers is not None else None
    if bank is not None:
        layers = layers or bank.layers
        bank.check_compatible("attention_bank", z_i.shape[2], tuple(z_i.shape[-2:]), video_denoiser.schedule,
                              layers, steps)
    elif mode == "inversion_sfi" and layers is None:
        raise ValueError("sfi_layers: the inversion + SFI block captures features and needs layers to capture")
    if mode == "sdedit":
        if noise is None:
            raise ValueError("the SDEdit T2V block needs a noise tensor")
        y = video_denoiser.schedule.add_noise(z_i, noise.to(z_i.device), steps[0])
    elif bank is None:
        y, bank = sfi_invert(video_denoiser, z_i, grid_v, guidance, layers, steps,
                             fixed_point_iters=fixed_point_iters, bank_dtype=bank_dtype, bank_device=bank_device,
                             callbacks=callbacks)
    else:
        y = ddim_invert(video_denoiser, z_i, grid_v, guidance, fixed_point_iters=fixed_point_iters,
                        callbacks=callbacks)
    if bank is None:
        return denoise_to_x0(video_denoiser, y, steps, guidance, callbacks=callbacks)
    with injecting(video_denoiser, bank, layers, sfi_gamma):
        return denoise_to_x0(video_denoiser, y, steps, guidance, callbacks=callbacks)


def check_bank_budget(video_denoiser, layers, z_shape: Sequence[int], n_steps: int, budget_gib: float, what: str,
                      dtype: torch.dtype = torch.float16) -> None:
    """Refuse, before any sampling, a Q/K/V bank of ``layers`` over ``n_steps`` timesteps for latents ``z_shape``
    that would exceed ``budget_gib`` GiB (``core.attention.check_budget``; 0 = no limit)."""
    layers = video_denoiser.attention_layers(layers)
    nbytes = video_denoiser.bank_bytes(layers, z_shape[2], tuple(z_shape[-2:]), n_steps, dtype)
    check_budget(nbytes, budget_gib, what, len(layers), n_steps)


def check_block(video_denoiser, z_shape: Sequence[int], params: EVSParams, what: str = "EVS") -> list:
    """Validate the block's settings before any sampling and return the T2V grid from t_V. Raises ValueError for
    t_V off the grid, n_V out of range, gamma outside [0, 1], an unknown mode, or (inversion + SFI) a bank over the
    budget."""
    if params.block not in BLOCK_MODES:
        raise ValueError(f"block must be one of {BLOCK_MODES}, got {params.block!r}")
    check_gamma(params.sfi_gamma)
    grid_v = t2v_grid(video_denoiser.schedule, params.t2v_steps, params.t2v_spacing, params.t_V, params.n_V)
    if params.block == "inversion_sfi":
        check_bank_budget(video_denoiser, params.sfi_layers, z_shape, params.n_V, params.bank_budget_gib, what,
                          params.bank_dtype)
    return grid_v


# ------------------------------------------------------------------ the whole refinement (Alg. 1, §5.2)
def plan(image_denoiser, video_denoiser, z_shape: Sequence[int], params: EVSParams, what: str = "EVS") -> tuple:
    """Check every setting before any work and return the grids ``(t2i grid from t1, T2I steps before t_T2V,
    T2I steps from t_T2V on, T2V grid from t_V)``. Raises ValueError for mismatched denoiser kinds, an unknown
    renoise, and the errors of ``t2i_grid``, ``split_at`` and ``check_block``."""
    if image_denoiser.kind != "image" or video_denoiser.kind != "video":
        raise ValueError(f"EVS needs an image (T2I) and a video (T2V) denoiser, got {image_denoiser.kind!r} and "
                         f"{video_denoiser.kind!r}")
    if params.renoise not in RENOISE:
        raise ValueError(f"renoise must be one of {RENOISE}, got {params.renoise!r}")
    grid_i = t2i_grid(image_denoiser.schedule, params.t2i_steps, params.s1)
    before, after = split_at(grid_i, params.t_T2V)
    return grid_i, before, after, check_block(video_denoiser, z_shape, params, what)


def evs_refine(image_denoiser, video_denoiser, z0: torch.Tensor, image_guidance: Guidance,
               video_guidance: Guidance, seed: int, params: EVSParams = EVSParams(), *,
               callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """T2I + [T2V] + T2I refinement of the clean source latent ``z0`` ``[1, 4, F, h, w]`` (METHODS.md §5.2).

    image_denoiser: the T2I model (kind "image", its own scaled_linear schedule, CFG in ``image_guidance``);
    video_denoiser: the T2V model (kind "video"; CFG 1 for Lightning in ``video_guidance``).
    Noise streams from ``seed``: "sdedit" (eps), "t2v" (eps' of the SDEdit block), "renoise" (fresh eps_r).
    UNet calls: T2I steps from t1 + 1 re-evaluation at t_T2V + n_V (+ inversion steps) T2V calls.
    Returns the refined clean latent ``[1, 4, F, h, w]`` float32. Raises ValueError for mismatched denoiser kinds
    and for settings that are off the grids (``t2i_grid``, ``split_at``, ``check_block``).
    """
    grid_i, before, after, grid_v = plan(image_denoiser, video_denoiser, z0.shape, params)
    device = z0.device
    eps = initial_noise(z0.shape, seed + STREAMS["sdedit"]).to(device)
    x = image_denoiser.schedule.add_noise(z0, eps, grid_i[0])                                      # Eq. 1
    x = ddim_sample(image_denoiser, x, before, image_guidance, end=params.t_T2V, callbacks=callbacks)
    z_i = predict_clean(image_denoiser, x, params.t_T2V, image_guidance, step=len(before), callbacks=callbacks)
    z_iv = t2v_block(video_denoiser, z_i, grid_v, params.n_V, video_guidance, mode=params.block,
                     noise=video_noise(video_denoiser, initial_noise(z0.shape, seed + STREAMS["t2v"]), seed),
                     sfi_layers=params.sfi_layers,
                     sfi_gamma=params.sfi_gamma, fixed_point_iters=params.fixed_point_iters,
                     bank_dtype=params.bank_dtype, bank_device=params.bank_device, callbacks=callbacks)
    eps_r = eps if params.renoise == "initial" else initial_noise(z0.shape, seed + STREAMS["renoise"]).to(device)
    x = image_denoiser.schedule.add_noise(z_iv, eps_r, params.t_T2V)                               # Eq. 10
    return ddim_sample(image_denoiser, x, after, image_guidance, callbacks=callbacks)


def unet_calls(params: EVSParams, grid_v: Sequence[int], per_step: bool = False) -> int:
    """The algorithm's minimum number of UNet calls: the T2I steps from t1, one re-evaluation at t_T2V, n_V T2V
    evaluations, and in "inversion_sfi" mode (1 + fixed_point_iters) per inversion step, one step per timestep of
    ``grid_v`` (the T2V grid from t_V to its end). ``per_step``: count each inversion step once (the progress
    steps ``evs_refine`` reports; fixed-point iterations belong to their step)."""
    t2i = int(params.t2i_steps * params.s1 + 1e-9)
    k = 0 if per_step else params.fixed_point_iters
    inv = len(grid_v) * (1 + k) if params.block == "inversion_sfi" else 0
    return t2i + 1 + params.n_V + inv
