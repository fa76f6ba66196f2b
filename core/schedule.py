"""Noise schedules: alpha-bar tables, timestep grids, DDIM arithmetic and equal-alpha-bar timestep mapping.

One ``NoiseSchedule`` per model family, built from the model's diffusers scheduler config. The tables come from
diffusers' own ``DDIMScheduler`` (so they equal diffusers bit for bit); everything else is a pure function of the
table, with no hidden step counter and no in-place dtype cast. Timesteps are integers 0..999 (floats are accepted
and interpolated, for mapped timesteps). ``None`` as a timestep means "end": the level after the last grid step,
whose alpha-bar is ``final_alpha_cumprod`` (``alphas_cumprod[0]`` for SD1.5/ZeroScope DDIM configs with
``set_alpha_to_one=False``; 1.0 for AnimateDiff, DDPM and Euler/Lightning).

Sources: DDIM (Song et al. 2021) Eq. 12; METHODS.md §0, §1.2-1.4; diffusers ``scheduling_ddim.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

Timestep = Union[int, float, None]

SD15_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                             steps_offset=1, prediction_type="epsilon", timestep_spacing="leading")
"""The DDIM config SD1.5, its task models, ModelScope and ZeroScope ship (scaled_linear betas)."""

ANIMATEDIFF_SCHEDULER_CONFIG = dict(SD15_SCHEDULER_CONFIG, beta_schedule="linear", set_alpha_to_one=True)
"""AnimateDiff's DDIM config: LDM 'sqrt_linear' (diffusers 'linear') betas, alpha-bar final 1."""

SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete diffusion noise schedule.

    Attributes:
        alphas_cumprod: float32 tensor [num_train_timesteps] on the CPU, alpha-bar(t) for t = 0..999.
        beta_schedule: "scaled_linear" (SD1.5, ZeroScope) or "linear" (AnimateDiff).
        final_alpha_cumprod: alpha-bar of the "end" level after the last sampling step.
        steps_offset: offset added to "leading" grids (1 for SD1.5: 981, 961, ..., 1).
        clip_sample: 0 (off), or the range r to which ``ddim_step`` clamps the predicted x0 (diffusers'
            ``clip_sample``; only the official I4VGen scheduler config uses it, r = 1). Set with
            ``dataclasses.replace``; configs read by ``from_config`` never turn it on.
    """
    alphas_cumprod: torch.Tensor
    beta_schedule: str
    final_alpha_cumprod: float
    steps_offset: int = 1
    config: dict = field(default_factory=dict)
    clip_sample: float = 0.0

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: dict, **overrides) -> "NoiseSchedule":
        """Build from a diffusers scheduler config dict (``scheduler_config.json`` content or ``scheduler.config``).

        Only epsilon prediction is supported. Raises ``ValueError`` for v-prediction or sample prediction and for
        unknown beta schedules (the message names the value found).
        """
        from diffusers import DDIMScheduler

        cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        cfg.update(overrides)
        pred = cfg.get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise ValueError(f"scheduler prediction_type is {pred!r}; only 'epsilon' models (SD1.5 family, "
                             "AnimateDiff, ZeroScope/ModelScope) are supported")
        beta = cfg.get("beta_schedule", "scaled_linear")
        if beta not in ("scaled_linear", "linear"):
            raise ValueError(f"beta_schedule {beta!r} is not supported; expected 'scaled_linear' or 'linear'")
        keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "set_alpha_to_one",
                "steps_offset", "trained_betas")
        sched = DDIMScheduler(**{k: cfg[k] for k in keep if k in cfg and cfg[k] is not None})
        acp = sched.alphas_cumprod.detach().clone().float()
        final = 1.0 if cfg.get("set_alpha_to_one", True) else float(acp[0])
        return cls(acp, beta, final, int(cfg.get("steps_offset", 0) or 0), dict(cfg, set_alpha_to_one=final == 1.0))

    @classmethod
    def sd15(cls) -> "NoiseSchedule":
        """SD1.5 / ZeroScope DDIM schedule (scaled_linear, alpha-bar final = alpha-bar(0) = 0.99915)."""
        return cls.from_config(SD15_SCHEDULER_CONFIG)

    @classmethod
    def animatediff(cls) -> "NoiseSchedule":
        """AnimateDiff DDIM schedule (linear betas, alpha-bar final = 1)."""
        return cls.from_config(ANIMATEDIFF_SCHEDULER_CONFIG)

    @property
    def num_train_timesteps(self) -> int:
        """Length of the alpha-bar table (1000): timesteps run 0..num_train_timesteps-1."""
        return int(self.alphas_cumprod.shape[0])

    def same_as(self, other: "NoiseSchedule") -> bool:
        """True when both schedules have identical alpha-bar tables (then timesteps need no mapping)."""
        return torch.equal(self.alphas_cumprod, other.alphas_cumprod)

    def describe(self) -> dict:
        """A small JSON-able description, carried by noisy ComfyUI LATENTs so the next node can check it."""
        return {"beta_schedule": self.beta_schedule, "final_alpha_cumprod": self.final_alpha_cumprod,
                "alpha_bar_999": round(float(self.alphas_cumprod[-1]), 8)}

    # ---------------------------------------------------------------- alpha-bar
    def alpha_bar(self, t: Timestep) -> torch.Tensor:
        """alpha-bar(t) as a float32 scalar tensor. ``t=None`` is the end level; float t is interpolated linearly.

        Raises ``ValueError`` for t outside [0, num_train_timesteps - 1].
        """
        if t is None:
            return torch.tensor(self.final_alpha_cumprod, dtype=torch.float32)
        t = float(t)
        if not 0.0 <= t <= self.num_train_timesteps - 1:
            raise ValueError(f"timestep {t} is outside 0..{self.num_train_timesteps - 1}")
        lo = int(t)
        if lo == t:
            return self.alphas_cumprod[lo].clone()
        hi, w = min(lo + 1, self.num_train_timesteps - 1), t - lo
        return (1 - w) * self.alphas_cumprod[lo] + w * self.alphas_cumprod[hi]

    def _coefs(self, t: Timestep, like: torch.Tensor):
        a = self.alpha_bar(t).to(device=like.device, dtype=torch.float32)
        return a.sqrt(), (1 - a).sqrt()

    # ---------------------------------------------------------------- pure DDIM arithmetic (float32)
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: Timestep) -> torch.Tensor:
        """q(x0, t, eps) = sqrt(ab(t)) x0 + sqrt(1 - ab(t)) eps (METHODS.md §0). Any shape; result float32."""
        a, s = self._coefs(t, x0)
        return a * x0.float() + s * eps.float()

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: Timestep) -> torch.Tensor:
        """x0_hat(x_t, t, eps) = (x_t - sqrt(1 - ab(t)) eps) / sqrt(ab(t)). Any shape; result float32."""
        a, s = self._coefs(t, x_t)
        return (x_t.float() - s * eps.float()) / a

    def ddim_step(self, x_t: torch.Tensor, eps: torch.Tensor, t: Timestep, t_next: Timestep,
                  eta: float = 0.0, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One DDIM move of latent ``x_t`` from level t to level t_next (either direction), DDIM paper Eq. 12.

        x_next = sqrt(ab(t_next)) x0_hat + sqrt(1 - ab(t_next) - sigma^2) eps + sigma noise, with
        sigma = eta sqrt((1-ab(t_next))/(1-ab(t))) sqrt(1 - ab(t)/ab(t_next)); eta > 0 needs ``noise`` and
        t_next below t. ``t_next=None`` is the end level. With ``clip_sample = r > 0`` x0_hat is clamped to [-r, r]
        first while eps is kept, as diffusers' ``DDIMScheduler.step`` does.
        """
        x0 = self.predict_x0(x_t, eps, t)
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample, self.clip_sample)
        a_next = self.alpha_bar(t_next).to(x0.device)
        if eta > 0:
            if noise is None:
                raise ValueError("ddim_step: eta > 0 needs a noise tensor")
            a_t = self.alpha_bar(t).to(x0.device)
            sigma = eta * ((1 - a_next) / (1 - a_t) * (1 - a_t / a_next)).clamp(min=0).sqrt()
            direction = (1 - a_next - sigma ** 2).clamp(min=0).sqrt() * eps.float()
            return a_next.sqrt() * x0 + direction + sigma * noise.to(x0)
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps.float()

    # ---------------------------------------------------------------- grids
    def timesteps(self, steps: int, spacing: str = "leading", strength: float = 1.0) -> list[int]:
        """The descending sampling grid tau_0 > ... > tau_{N-1}, cut to the last ``strength`` part (SDEdit).

        spacing (METHODS.md §1.3, diffusers' ``set_timesteps``):
          - "leading": (N-1-i)*(T//N) + steps_offset  -> N=50: 981, 961, ..., 1
          - "trailing": round(T - i*T/N) - 1          -> N=8: 999, 874, ..., 124 (Lightning)
          - "linspace": round(linspace(0, T-1, N))[::-1] -> N=50: 999, 979, ..., 0
        strength in (0, 1]: keep the last ``min(floor(N*strength + 1e-9), N)`` steps (at least one), so 1.0 is the
        whole grid and 0.5 starts halfway. Raises ``ValueError`` for steps < 1, unknown spacing or strength
        outside (0, 1].
        """
        T = self.num_train_timesteps
        if int(steps) != steps or steps < 1 or steps > T:
            raise ValueError(f"steps must be an integer in 1..{T}, got {steps}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        n = int(steps)
        if spacing == "leading":
            grid = [(n - 1 - i) * (T // n) + self.steps_offset for i in range(n)]
        elif spacing == "trailing":
            grid = [int(round(T - i * T / n)) - 1 for i in range(n)]
        else:
            grid = torch.linspace(0, T - 1, n, dtype=torch.float64).round().long().flip(0).tolist()
        grid = [min(max(int(t), 0), T - 1) for t in grid]
        keep = max(1, min(int(n * strength + 1e-9), n))
        return grid[n - keep:]

    # ---------------------------------------------------------------- mapping between schedules
    def map_timestep(self, t: Timestep, other: "NoiseSchedule", exact: bool = False) -> Timestep:
        """The timestep of ``other`` whose alpha-bar equals this schedule's alpha-bar(t) (METHODS.md §1.4).

        Returns the nearest integer ``argmin_u |ab_other(u) - ab_self(t)|`` (``exact=True``: a float found by
        linear interpolation in the monotone table). Levels noisier than ``other`` ever saw clamp to its last
        timestep (AnimateDiff t >= 906 -> SD1.5 999). ``None`` (the end level) maps to ``None``; identical tables
        map t to itself.
        """
        if t is None or self.same_as(other):
            return t
        target = self.alpha_bar(t)
        table = other.alphas_cumprod
        if not exact:
            return int((table - target).abs().argmin())
        if target <= table[-1]:
            return other.num_train_timesteps - 1
        if target >= table[0]:
            return 0
        hi = int((table < target).nonzero()[0])          # first index with ab below target (table decreases)
        lo = hi - 1
        w = float((table[lo] - target) / (table[lo] - table[hi]))
        return lo + w
