"""Pixels <-> latents with the SD VAE, in frame chunks, plus the input checks every method shares.

Layouts: pixels ``[1, 3, F, H, W]`` in -1..1; latents ``[1, 4, F, h, w]`` scaled by ``vae.config.scaling_factor``
(0.18215 for SD1.5; diffusers convention), h = H/8, w = W/8. Encoding uses the posterior mean by default
(METHODS.md §1.5). On a CUDA out-of-memory error the chunk is halved and the chunk retried (the other chunks keep
their results), as ComfyUI's own upscale node does.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from einops import rearrange

from .callbacks import NO_CALLBACKS, Callbacks

OOM_ERRORS = (torch.cuda.OutOfMemoryError,) if hasattr(torch.cuda, "OutOfMemoryError") else ()


def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], frames: torch.Tensor, chunk: int,
             callbacks: Callbacks) -> torch.Tensor:
    out, i, chunk = [], 0, max(1, int(chunk))
    while i < frames.shape[0]:
        callbacks.check()
        try:
            out.append(fn(frames[i:i + chunk]))
        except OOM_ERRORS:
            if chunk == 1:
                raise
            torch.cuda.empty_cache()
            chunk = max(1, chunk // 2)
            continue
        i += out[-1].shape[0]
        callbacks.step(None)
    return torch.cat(out)


def vae_scale(vae) -> float:
    """The VAE's latent scaling factor (``config.scaling_factor``; 0.18215 for the SD VAE)."""
    return float(getattr(vae.config, "scaling_factor", 0.18215))


def encode_video(vae, pixels: torch.Tensor, chunk: int = 8, sample: bool = False,
                 generator: Optional[torch.Generator] = None, callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """VAE-encode ``[1, 3, F, H, W]`` pixels in -1..1 to scaled latents ``[1, 4, F, H/8, W/8]`` float32.

    ``sample=True`` draws from the posterior with ``generator`` (official BIVDiff, METHODS.md §7.1 B8) instead of
    taking its mean. Raises ValueError for H or W not a multiple of 8 or an empty clip.
    """
    check_pixels("pixels", pixels)
    p = next(vae.parameters())
    frames = rearrange(pixels, "b c f h w -> (b f) c h w")

    def enc(x):
        dist = vae.encode(x.to(p.device, p.dtype)).latent_dist
        if sample:
            noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(dist.mean.device)
            return (dist.mean.float() + dist.std.float() * noise) * vae_scale(vae)
        return dist.mean.float() * vae_scale(vae)

    z = _chunked(enc, frames, chunk, callbacks)
    return rearrange(z, "(b f) c h w -> b c f h w", b=pixels.shape[0])


def decode_video(vae, latents: torch.Tensor, chunk: int = 8, callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """VAE-decode scaled latents ``[1, 4, F, h, w]`` to pixels ``[1, 3, F, 8h, 8w]`` in -1..1 (clamped), float32.

    Raises ValueError when the decode produced NaN or inf (an fp16 VAE overflow: run the VAE in fp32).
    """
    p = next(vae.parameters())
    frames = rearrange(latents, "b c f h w -> (b f) c h w")
    dec = lambda z: vae.decode(z.to(p.device, p.dtype) / vae_scale(vae)).sample.float()
    x = _chunked(dec, frames, chunk, callbacks)
    if not torch.isfinite(x).all():
        raise ValueError(f"the VAE ({p.dtype}) decoded NaN or inf values; run the VAE in fp32")
    return rearrange(x.clamp(-1, 1), "(b f) c h w -> b c f h w", b=latents.shape[0])


# ------------------------------------------------------------------ checks shared by the methods
def check_pixels(name: str, pixels: torch.Tensor) -> None:
    """Raise ValueError unless ``pixels`` is ``[1, 3, F>0, H, W]`` with H and W multiples of 8."""
    if pixels.dim() != 5 or pixels.shape[1] != 3:
        raise ValueError(f"{name}: expected pixels [1, 3, F, H, W], got shape {tuple(pixels.shape)}")
    check_frames(name, pixels.shape[2])
    check_size(name, pixels.shape[-2], pixels.shape[-1])


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise ValueError naming input ``name`` when ``x`` holds NaN or inf (before any model sees it)."""
    if x.is_floating_point() and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: contains NaN or inf values ({bad} of {x.numel()}); check the node that made it")


def check_size(name: str, height: int, width: int, multiple: int = 8) -> None:
    """Raise ValueError unless height and width are positive multiples of ``multiple`` (the VAE needs 8)."""
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"{name}: width and height must be positive multiples of {multiple}, got {width}x{height}; "
                         f"resize to {max(multiple, width // multiple * multiple)}x"
                         f"{max(multiple, height // multiple * multiple)} first")


def check_frames(name: str, count: int, expected: Optional[int] = None) -> None:
    """Raise ValueError for an empty frame batch, or a count that is neither ``expected`` nor 1 (broadcast)."""
    if count < 1:
        raise ValueError(f"{name}: the frame batch is empty; expected at least one frame")
    if expected is not None and count not in (1, expected):
        raise ValueError(f"{name}: has {count} frames but the video has {expected}; give {expected} frames "
                         "(or 1, used for every frame)")


def broadcast_frames(name: str, x: torch.Tensor, frames: int, dim: int = 0) -> torch.Tensor:
    """Check ``x`` has ``frames`` or 1 entries along ``dim`` and expand it to ``frames``."""
    check_frames(name, x.shape[dim], frames)
    if x.shape[dim] == frames:
        return x
    shape = [-1] * x.dim()
    shape[dim] = frames
    return x.expand(*shape)
