"""ComfyUI's own models as core denoisers: a native ``MODEL`` with ``CONDITIONING`` presented to the core samplers as
``eps = denoiser(x_t, t, guidance, step=i)``.

The core loop runs INSIDE ComfyUI's sampler machinery: ``run`` starts a ``comfy.samplers.CFGGuider`` (the guider
KSampler uses) with a ``KSAMPLER`` whose sampler function is the core loop. ComfyUI therefore loads the model and
its additional models, processes the conds (ControlNet / T2I-Adapter / IPAdapter / area conds, hooks), applies
LoRAs and model patches on its cloned patcher and cleans everything up, also after an exception or Cancel; the
user's MODEL object is never touched. Each core denoiser call converts between the core's DDPM parametrisation and
ComfyUI's k-diffusion one through the model's own ``model_sampling``:

    sigma = sqrt((1 - abar(t)) / abar(t)),   x_k = x_t / sqrt(abar(t)),   eps = (x_k - D(x_k, sigma)) / sigma

where D is the guided denoised prediction of ComfyUI's ``sampling_function`` (CFG over the positive and negative
conds). The model turns sigma back into the integer timestep t (nearest entry of its sigma table), so it is
evaluated at exactly the core's timesteps. Latents are the core's scaled ``[1, 4, F, h, w]``; frames are the batch.

Scope of this first native path: SD1.5-family epsilon models (ComfyUI ``latent_formats.SD15``); the guidance is the
run's conds and cfg, so the ``Guidance`` argument of the protocol is not read (one CFG pair per run).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import comfy.latent_formats
import comfy.model_sampling
import comfy.samplers
import torch
from einops import rearrange

from ..core.denoisers import Branch, single
from ..core.schedule import NoiseSchedule, Timestep

GUIDANCE = single(Branch(torch.zeros(1, 1, 1), role="cond"))
"""The ``Guidance`` core functions pass to a ``NativeDenoiser``: a placeholder (the run's conds and cfg guide)."""


def schedule_of(model, name: str) -> NoiseSchedule:
    """The core schedule of a native ``MODEL`` (a ComfyUI ModelPatcher): SD1.5's, after checking that the model is
    an SD1.5-family epsilon model on that schedule. Raises ValueError naming input ``name`` otherwise (SDXL, SD3,
    Flux, v-prediction, another noise schedule), with what was found."""
    base = model.model
    family = type(getattr(base, "model_config", None)).__name__
    if not isinstance(getattr(base, "latent_format", None), comfy.latent_formats.SD15):
        raise ValueError(f"{name}: this MODEL is {family} ({type(base.latent_format).__name__} latents); only SD1.5-"
                         "family models (SD1.5 checkpoints, their LoRAs and merges) are supported here")
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.EPS) or isinstance(ms, comfy.model_sampling.V_PREDICTION):
        raise ValueError(f"{name}: this MODEL predicts {type(ms).__name__}; only epsilon-prediction SD1.5 models "
                         "are supported (remove ModelSamplingDiscrete v_prediction patches)")
    sd = NoiseSchedule.sd15()
    sigmas = getattr(ms, "sigmas", None)
    if sigmas is None or sigmas.shape[0] != sd.num_train_timesteps:
        raise ValueError(f"{name}: this MODEL samples on a continuous or {getattr(sigmas, 'shape', ['?'])[0]}-step "
                         "schedule; the SD1.5 1000-step schedule is needed")
    abar = 1.0 / (1.0 + sigmas.double().cpu() ** 2)
    if float(((abar - sd.alphas_cumprod.double()).abs() / sd.alphas_cumprod.double()).max()) > 1e-4:
        raise ValueError(f"{name}: this MODEL's noise schedule is not SD1.5's (zero-terminal SNR or a patched "
                         "schedule); remove the schedule patch")
    return sd


def sigma_of(schedule: NoiseSchedule, t: Timestep) -> float:
    """ComfyUI's k-diffusion noise level of timestep ``t``: ``sqrt((1 - abar(t)) / abar(t))``."""
    abar = float(schedule.alpha_bar(t))
    return math.sqrt((1.0 - abar) / abar)


class NativeDenoiser:
    """Core image denoiser over ComfyUI's guided model inside a running sampler (``run``): frames are the batch.

    model_k: the sampler's model callable ``(x_k, sigma, **extra_args) -> denoised``; schedule: the core schedule
    (``schedule_of``). ``calls`` counts the guided evaluations.
    """
    kind = "image"

    def __init__(self, model_k, extra_args: dict, schedule: NoiseSchedule):
        self.model_k, self.extra_args, self.schedule = model_k, extra_args, schedule
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: Timestep, guidance=None, step: Optional[int] = None) -> torch.Tensor:
        """Guided eps ``[1, 4, F, h, w]`` float32 at timestep ``t`` (0..999) for the scaled latent ``x``."""
        sigma = sigma_of(self.schedule, t)
        frames = rearrange(x, "b c f h w -> (b f) c h w")
        xk = frames * math.sqrt(1.0 + sigma * sigma)                    # x_t / sqrt(abar)
        s = torch.full((frames.shape[0],), sigma, device=frames.device, dtype=torch.float32)
        denoised = self.model_k(xk, s, **self.extra_args).float()
        self.calls += 1
        eps = (xk - denoised) / sigma
        return rearrange(eps, "(b f) c h w -> b c f h w", b=x.shape[0])


def run(model, positive, negative, cfg: float, latent: torch.Tensor, timesteps, schedule: NoiseSchedule,
        loop: Callable[[NativeDenoiser], torch.Tensor], seed: int = 0) -> torch.Tensor:
    """Run ``loop(denoiser)`` (a core sampler or inversion on the scaled latent ``[1, 4, F, h, w]`` it closes over)
    inside ComfyUI's CFGGuider for ``model`` with ``positive`` / ``negative`` conds at ``cfg`` (negative may be None
    at cfg 1). ``latent`` gives the batch shape and device; ``timesteps`` (the core grid, 0..999) become the
    sampler's sigmas, which model patches read. Returns what ``loop`` returns, float32."""
    frames = rearrange(latent, "b c f h w -> (b f) c h w")
    sigmas = torch.tensor([sigma_of(schedule, t) for t in timesteps] + [0.0], dtype=torch.float32)
    out = {}

    def sampler_function(model_k, noise, sigmas, extra_args=None, callback=None, disable=None):
        out["x"] = loop(NativeDenoiser(model_k, extra_args or {}, schedule))
        return noise

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative if negative is not None else positive)
    guider.set_cfg(cfg)
    guider.sample(torch.zeros_like(frames), torch.zeros_like(frames), comfy.samplers.KSAMPLER(sampler_function),
                  sigmas, seed=seed)
    return out["x"].float()
