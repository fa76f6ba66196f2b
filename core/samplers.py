"""Samplers as functions (in the style of k-diffusion's ``sampling.py``): DDIM sampling, DDIM inversion, SDEdit.

Every function takes a denoiser (``core.denoisers``; its ``.schedule`` defines alpha-bar), a latent
``[1, 4, F, h, w]`` float32 scaled by the VAE factor, a descending timestep grid ``tau_0 > ... > tau_{N-1}`` (from
``NoiseSchedule.timesteps``), a ``Guidance`` and ``Callbacks``. The level after ``tau_{N-1}`` is "end"
(``schedule.final_alpha_cumprod``). Master latents stay float32; only the UNet input is cast.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .callbacks import NO_CALLBACKS, Callbacks
from .denoisers import Guidance
from .schedule import Timestep


def _check_grid(timesteps: Sequence[int], name: str = "timesteps") -> list:
    grid = list(timesteps)
    if not grid:
        raise ValueError(f"{name} is empty; expected at least one timestep")
    if any(a <= b for a, b in zip(grid, grid[1:])):
        raise ValueError(f"{name} must be strictly descending (tau_0 > ... > tau_N-1), got {grid[:4]}...")
    return grid


def initial_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """One seeded draw of ``shape`` (``[1, 4, F, h, w]``) float32 on the CPU (reproducible across hardware; frame f's
    noise is slice f). Methods give each named purpose its own stream as ``seed + offset``."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def ddim_sample(denoiser, x: torch.Tensor, timesteps: Sequence[int], guidance: Guidance, *, eta: float = 0.0,
                generator: Optional[torch.Generator] = None, end: Timestep = None,
                after_step: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
                callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, Eq. 12) from ``x`` at level ``timesteps[0]`` to level ``end``.

    Args:
        x: ``[1, 4, F, h, w]`` latent at ``timesteps[0]``.
        timesteps: descending grid; step i goes from ``timesteps[i]`` to ``timesteps[i+1]`` (or ``end``).
        eta: DDIM stochasticity; eta > 0 draws noise from ``generator`` on the CPU (float32), then moves it.
        end: the level after the last step: None is the schedule's end level (a clean latent); a timestep below
            ``timesteps[-1]`` stops there (EVS stops the T2I loop at t_T2V).
        after_step: ``after_step(i, x) -> x`` applied to the latent after step i (Prompt2Prompt's LocalBlend).
    Returns: the latent at ``end``, ``[1, 4, F, h, w]`` float32. One denoiser call per step.
    """
    grid = _check_grid(timesteps)
    if end is not None and end >= grid[-1]:
        raise ValueError(f"end ({end}) must be below the last timestep of the grid ({grid[-1]})")
    sched = denoiser.schedule
    x = x.float()
    for i, t in enumerate(grid):
        callbacks.check()
        eps = denoiser(x, t, guidance, step=i)
        t_next = grid[i + 1] if i + 1 < len(grid) else end
        noise = None
        if eta > 0 and t_next is not None:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        x0 = sched.predict_x0(x, eps, t)
        x = sched.ddim_step(x, eps, t, t_next, eta=eta if t_next is not None else 0.0, noise=noise)
        if after_step is not None:
            x = after_step(i, x)
        callbacks.step(x0)
    return x


def ddim_invert(denoiser, z0: torch.Tensor, timesteps: Sequence[int], guidance: Guidance, *,
                fixed_point_iters: int = 0, legacy_grid: bool = False,
                callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """Deterministic DDIM inversion of a clean latent up to ``timesteps[0]``, the level the sampler starts from.

    Runs the sampler grid backwards (METHODS.md §1.6): from the end level through ``tau_{N-1}, ..., tau_0``; the step
    from level s to level t evaluates ``e = eps(x, t)`` (target timestep, source latent) and sets
    ``x <- sqrt(ab(t)) x0_hat(x, s, e) + sqrt(1-ab(t)) e``. With ``fixed_point_iters = K > 0`` each step re-evaluates
    ``e = eps(x_new, t)`` K more times, which solves the implicit DDIM equation so that ``ddim_sample`` with the same
    denoiser and guidance returns to ``z0`` (K extra calls per step; MODELS.md §5).

    ``legacy_grid`` reproduces the official BIVDiff ``reverse_step`` (models/scheduling_ddim.py, METHODS.md §7.1 B2):
    the clean latent is treated as level ``tau_{N-1}`` (t=1), each step evaluates eps at its SOURCE level and moves
    to ``min(T-2, s + T//N)``, so the last step goes 981 -> 998 while the sampler then starts "at 981". For parity
    tests only; it has no fixed-point iterations.

    Args: z0 ``[1, 4, F, h, w]`` scaled clean latent. Returns the noisy latent, same shape, float32.
    Raises ValueError for a bad grid, negative K, or K > 0 with ``legacy_grid``.
    """
    grid = _check_grid(timesteps)
    if fixed_point_iters < 0:
        raise ValueError(f"fixed_point_iters must be >= 0, got {fixed_point_iters}")
    sched = denoiser.schedule
    x = z0.float()
    if legacy_grid:
        if fixed_point_iters:
            raise ValueError("legacy_grid reproduces the official code, which has no fixed-point iterations")
        T, n = sched.num_train_timesteps, len(grid)
        for i, s in reversed(list(enumerate(grid))):
            callbacks.check()
            e = denoiser(x, s, guidance, step=i)
            x = sched.ddim_step(x, e, s, min(T - 2, s + T // n))
            callbacks.step(sched.predict_x0(x, e, min(T - 2, s + T // n)))
        return x
    levels = [None] + list(reversed(grid))
    for i, s, t in zip(reversed(range(len(grid))), levels[:-1], levels[1:]):
        callbacks.check()
        e = denoiser(x, t, guidance, step=i)
        x_new = sched.ddim_step(x, e, s, t)
        for _ in range(fixed_point_iters):
            callbacks.check()
            e = denoiser(x_new, t, guidance, step=i)
            x_new = sched.ddim_step(x, e, s, t)
        x = x_new
        callbacks.step(sched.predict_x0(x, e, t))
    return x


def sdedit(denoiser, x0: torch.Tensor, timesteps: Sequence[int], guidance: Guidance, noise: torch.Tensor, *,
           callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): noise a clean latent to ``timesteps[0]`` with ``q(x0, t, noise)``, then DDIM-sample.

    ``timesteps`` is usually a strength-cut grid (``schedule.timesteps(steps, strength=s)``). ``noise`` has the
    shape of ``x0`` (draw it on the CPU from a seeded generator). Returns the clean latent, float32.
    """
    grid = _check_grid(timesteps)
    x = denoiser.schedule.add_noise(x0, noise.to(x0.device), grid[0])
    return ddim_sample(denoiser, x, grid, guidance, callbacks=callbacks)


def predict_clean(denoiser, x: torch.Tensor, t: Timestep, guidance: Guidance, *, step: Optional[int] = None,
                  callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """One denoiser evaluation at level ``t`` and the predicted clean latent ``x0_hat(x, t, eps)`` (METHODS.md §0),
    ``[1, 4, F, h, w]`` float32: the bridge between models with different schedules (EVS)."""
    callbacks.check()
    x0 = denoiser.schedule.predict_x0(x, denoiser(x, t, guidance, step=step), t)
    callbacks.step(x0)
    return x0
