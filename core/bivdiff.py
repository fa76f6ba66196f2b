"""BIVDiff: frame-wise image-model generation -> Mixed Inversion -> video-model temporal smoothing.

Shi et al., "BIVDiff: A Training-Free Framework for General-Purpose Video Synthesis via Bridging Image and Video
Diffusion Models", CVPR 2024 (seeds 000/001); official code MCG-NJU/BIVDiff. Exact steps and defaults:
METHODS.md §2, deviations from the official code §7.1.

    1. frame-wise IDM (paper Eq. 1): every frame sampled independently by the image model (SD1.5 with ControlNet,
       InstructPix2Pix, inpainting/outpainting), batched; frame f's noise is slice f of one seeded draw.
    2. Mixed Inversion (Eqs. 2-4): Z_T = alpha * DDIMinv_image(Z0) + (1 - alpha) * DDIMinv_video(Z0), both on the
       smoothing sampler's grid and ending exactly at its first timestep; the zero-weight inversion is skipped.
    3. temporal smoothing (Eq. 5): DDIM with the video model from Z_T, classifier-free guided by the VDM prompt.

Layouts: latents ``[1, 4, F, h, w]`` scaled by 0.18215; pixels ``[1, 3, F, H, W]`` in -1..1; masks ``[F, H, W]``
with 1 = repaint; text embeddings ``[1, 77, D]`` of the model they are for (CLIP-L 768 for SD1.5/AnimateDiff,
OpenCLIP-H 1024 for ZeroScope).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .callbacks import NO_CALLBACKS, Callbacks
from .denoisers import Branch, Guidance, cfg, ip2p
from .latents import broadcast_frames, encode_video, vae_scale
from .samplers import ddim_invert, ddim_sample

TASKS = ("text", "controlnet", "instruct_pix2pix", "inpaint", "outpaint")
DEFAULT_ALPHA = {"text": 1.0, "controlnet": 1.0, "instruct_pix2pix": 1.0, "inpaint": 0.1, "outpaint": 0.1,
                 "prompt2prompt": 0.25}
"""Per-task image share alpha of the mixed inversion (METHODS.md §2.5)."""
DEFAULT_STEPS, DEFAULT_CFG, DEFAULT_IMAGE_GUIDANCE = 50, 7.5, 1.5
REGIONS = ("horizontal", "vertical", "centre")


# ------------------------------------------------------------------ step 1: frame-wise IDM conditioning
def region_mask(frames: int, height: int, width: int, region: str = "horizontal",
                fraction: float = 0.25) -> torch.Tensor:
    """Inpainting/outpainting mask ``[F, H, W]`` (1 = fill), METHODS.md §2.2 (fraction 0.25): "horizontal" fills the
    top and bottom ``int(fraction*H)`` rows, "vertical" the left and right ``int(fraction*W)`` columns (outpainting),
    "centre" everything but that border on all four sides (inpainting the middle). Raises ValueError for an unknown
    region or a fraction outside (0, 0.5)."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    if not 0.0 < fraction < 0.5:
        raise ValueError(f"fraction must be in (0, 0.5), got {fraction}")
    bh, bw = int(height * fraction), int(width * fraction)
    m = torch.zeros(frames, height, width)
    if region == "horizontal":
        m[:, :bh], m[:, height - bh:] = 1, 1
    elif region == "vertical":
        m[:, :, :bw], m[:, :, width - bw:] = 1, 1
    else:
        m[:, bh:height - bh, bw:width - bw] = 1
    return m


def inpaint_concat(vae, pixels: torch.Tensor, mask: torch.Tensor, chunk: int = 8,
                   callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """The extra UNet input of SD-inpainting: ``[1, 5, F, h, w]`` = [mask at latent size (nearest);
    0.18215 * mean(E(V * (M < 0.5)))] (METHODS.md §2.2, MODELS.md §3.3; diffusers StableDiffusionInpaintPipeline).

    pixels: ``[1, 3, F, H, W]`` in -1..1; mask: ``[F, H, W]`` or ``[1, H, W]`` in 0..1, 1 = repaint; soft masks are
    binarised at 0.5 (diffusers' ``prepare_mask_and_masked_image``).
    Raises ValueError when the mask's frame count or size does not match the video.
    """
    n, (H, W) = pixels.shape[2], pixels.shape[-2:]
    if mask.dim() != 3 or tuple(mask.shape[-2:]) != (H, W):
        raise ValueError(f"mask: expected [F, {H}, {W}] to match the video, got {tuple(mask.shape)}")
    mask = broadcast_frames("mask", (mask >= 0.5).float(), n).to(pixels.device)       # binarised as diffusers does
    masked = pixels * (mask < 0.5).to(pixels.dtype)[None, None]
    z = encode_video(vae, masked, chunk=chunk, callbacks=callbacks)
    m = F.interpolate(mask[:, None], size=z.shape[-2:], mode="nearest")           # [F, 1, h, w]
    return torch.cat([m.permute(1, 0, 2, 3)[None].to(z), z], dim=1)


def ip2p_image_latent(vae, pixels: torch.Tensor, chunk: int = 8, callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """InstructPix2Pix source-image conditioning: the UNSCALED posterior mean ``mean(E(V))`` ``[1, 4, F, h, w]``."""
    return encode_video(vae, pixels, chunk=chunk, callbacks=callbacks) / vae_scale(vae)


def idm_guidance(task: str, text: torch.Tensor, null: torch.Tensor, *, cfg_scale: float = DEFAULT_CFG,
                 image_scale: float = DEFAULT_IMAGE_GUIDANCE, control: Optional[torch.Tensor] = None,
                 concat: Optional[torch.Tensor] = None) -> Guidance:
    """Guidance of the frame-wise image model for ``task`` (METHODS.md §2.2).

    text / null: ``[1, 77, 768]`` prompt and negative-prompt embeddings. control: ControlNet hints ``[F, 3, H, W]``
    in 0..1 ("controlnet"); concat: "instruct_pix2pix" unscaled source latent ``[1, 4, F, h, w]``
    (``ip2p_image_latent``) or "inpaint"/"outpaint" ``[1, 5, F, h, w]`` (``inpaint_concat``).
    Raises ValueError for an unknown task or a missing task input.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "controlnet" and control is None:
        raise ValueError("task 'controlnet' needs control hints")
    if task in ("instruct_pix2pix", "inpaint", "outpaint") and concat is None:
        raise ValueError(f"task {task!r} needs source frames" + (" and a mask" if task != "instruct_pix2pix" else ""))
    if task == "instruct_pix2pix":
        return ip2p(text, null, concat, cfg_scale, image_scale)
    return cfg(Branch(text, concat, control), Branch(null, concat, control), cfg_scale)


def framewise_generate(image_denoiser, noise: torch.Tensor, timesteps: Sequence[int], guidance: Guidance,
                       callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """Step 1 (paper Eq. 1): DDIM-sample every frame independently with the image model, as one batch.

    noise: ``[1, 4, F, h, w]`` (``samplers.initial_noise``: frame f's noise is slice f, §7.1 B4) at ``timesteps[0]``. Returns clean latents ``[1, 4, F, h, w]``.
    """
    if image_denoiser.kind != "image":
        raise ValueError("frame-wise generation needs an image denoiser")
    return ddim_sample(image_denoiser, noise, timesteps, guidance, callbacks=callbacks)


# ------------------------------------------------------------------ step 2: mixed inversion
def check_alpha(alpha: float) -> float:
    """Return alpha as a float; ValueError (naming alpha, the value and [0, 1]) when it is outside [0, 1]."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha (the image model's share of the mixed inversion) must be in [0, 1], got {alpha}")
    return float(alpha)


def mix_latents(z_image: Optional[torch.Tensor], z_video: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
    """Mixed Inversion (paper Eq. 4): ``alpha * z_image + (1 - alpha) * z_video``, float32.

    At alpha = 1 (0) the other latent is not needed and may be None; the result is then exactly ``z_image``
    (``z_video``). Raises ValueError for alpha outside [0, 1], a missing needed latent, or mismatched shapes.
    """
    alpha = check_alpha(alpha)
    if alpha == 1.0 or alpha == 0.0:
        z = z_image if alpha == 1.0 else z_video
        if z is None:
            raise ValueError(f"alpha = {alpha} needs the {'image' if alpha == 1.0 else 'video'} inversion")
        return z.float()
    if z_image is None or z_video is None:
        raise ValueError(f"alpha = {alpha} mixes both inversions; both latents are needed")
    if z_image.shape != z_video.shape:
        raise ValueError(f"image and video inversions differ in shape: {tuple(z_image.shape)} vs "
                         f"{tuple(z_video.shape)}")
    return alpha * z_image.float() + (1.0 - alpha) * z_video.float()


def mixed_inversion(z0: torch.Tensor, timesteps: Sequence[int], alpha: float, *, image_denoiser=None,
                    video_denoiser=None, image_guidance: Optional[Guidance] = None,
                    video_guidance: Optional[Guidance] = None, fixed_point_iters: int = 0,
                    legacy_grid: bool = False, callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """Step 2 (paper Eqs. 2-4, METHODS.md §2.3): invert ``z0`` ``[1, 4, F, h, w]`` with the image model frame-wise
    and with the video model over the whole clip, on the smoothing sampler's grid ``timesteps`` (of the video
    model's schedule; the image denoiser must already be on it, see ``denoisers.on_schedule``), ending at
    ``timesteps[0]``, and mix with ``alpha``. The inversion whose weight is 0 is not computed (§7.1 B7).

    Guidance defaults to no CFG (give the null-prompt embedding as a single branch). Returns Z_T, float32.
    """
    alpha = check_alpha(alpha)
    z_img = z_vid = None
    kw = dict(fixed_point_iters=fixed_point_iters, legacy_grid=legacy_grid, callbacks=callbacks)
    if alpha > 0.0:
        if image_denoiser is None or image_guidance is None:
            raise ValueError(f"alpha = {alpha} needs the image model and its inversion prompt")
        z_img = ddim_invert(image_denoiser, z0, timesteps, image_guidance, **kw)
    if alpha < 1.0:
        if video_denoiser is None or video_guidance is None:
            raise ValueError(f"alpha = {alpha} needs the video model and its inversion prompt")
        z_vid = ddim_invert(video_denoiser, z0, timesteps, video_guidance, **kw)
    return mix_latents(z_img, z_vid, alpha)


# ------------------------------------------------------------------ step 3: temporal smoothing
def temporal_smoothing(video_denoiser, z_t: torch.Tensor, timesteps: Sequence[int], guidance: Guidance,
                       callbacks: Callbacks = NO_CALLBACKS) -> torch.Tensor:
    """Step 3 (paper Eq. 5): DDIM (eta 0) with the video model from Z_T at ``timesteps[0]`` to the end, guided by
    the VDM prompt (``cfg(Branch(P*), Branch(negative), 7.5)``). Returns the clean latent ``[1, 4, F, h, w]``."""
    if video_denoiser.kind != "video":
        raise ValueError("temporal smoothing needs a video denoiser")
    return ddim_sample(video_denoiser, z_t, timesteps, guidance, callbacks=callbacks)

