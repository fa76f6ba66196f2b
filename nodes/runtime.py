"""ComfyUI runtime glue: model management, dtypes, progress/preview/Cancel, and IMAGE/MASK/LATENT conversion.

Heavy diffusers modules go through ``comfy.model_patcher.ModelPatcher`` (inside a plain holder module, because
diffusers' ``ModelMixin.device`` is read-only) and are loaded with ``load_models_gpu(..., force_full_load=True)``
right before use (COMFYUI.md §7). Returned tensors go to ``intermediate_device()``.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import comfy.latent_formats
import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import latent_preview
import torch
from einops import rearrange

from ..core.callbacks import Callbacks
from ..core.context import ContextWindows, windowed
from ..core.denoisers import VideoDenoiser
from ..core.latents import check_finite, check_frames, check_size
from ..core.models import ImageModel, VideoModel
from ..core.schedule import NoiseSchedule

DTYPES = ["auto", "fp32", "fp16", "bf16"]
_NAMED = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModuleHolder(torch.nn.Module):
    """ModelPatcher writes ``.device`` and other attributes on the module it wraps; diffusers models refuse that."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module


def patcher(module: torch.nn.Module, role: str = "unet"):
    offload = {"unet": mm.unet_offload_device, "text": mm.text_encoder_offload_device,
               "vae": mm.vae_offload_device}[role]()
    return comfy.model_patcher.ModelPatcher(ModuleHolder(module), load_device=mm.get_torch_device(),
                                            offload_device=offload)


def activation_bytes(rows: int, latent_hw, dtype: torch.dtype = torch.float16) -> int:
    """Activation memory of one SD1.5-family UNet call on ``rows`` latents of ``latent_hw`` (frames x guidance
    branches), by ComfyUI's own estimate for these models (``comfy/model_base.py`` ``BaseModel.memory_required``,
    ``memory_usage_factor`` 1.0): ``rows*h*w*dtype_size*0.01`` MiB with PyTorch flash / xformers attention, else
    ``rows*h*w*0.15`` MiB. Video-model calls give SD1.5-equivalent rows (``video_rows``: ``ACTIVATION_FACTOR``)."""
    h, w = latent_hw
    area = max(0, int(rows)) * int(h) * int(w)
    if mm.xformers_enabled() or mm.pytorch_attention_flash_attention():
        return int(area * mm.dtype_size(dtype) * 0.01 * 1024 * 1024)
    return int(area * 0.15 * 1024 * 1024)


def load(*patchers, rows: int = 0, latent_hw=(0, 0)) -> torch.device:
    """Load exactly these patchers onto the compute device; ComfyUI evicts other models to leave room for the
    activations of UNet calls on ``rows`` latents of ``latent_hw`` (``activation_bytes``), as its own samplers do."""
    unique = list({id(p): p for p in patchers if p is not None}.values())   # AnimateDiff shares the image's patcher
    mm.load_models_gpu(unique, memory_required=activation_bytes(rows, latent_hw), force_full_load=True)
    return mm.get_torch_device()


def frame_chunk(requested: int, frames: int, branches: int, latent_hw) -> Optional[int]:
    """Frames per image-UNet call: ``requested`` when set (> 0); else, on a GPU, as many as the free memory holds
    by ``activation_bytes`` (call after ``load``); None (all frames) on the CPU. The UNet2D denoiser halves it again
    on an out-of-memory error; chunking never changes an image model's result."""
    if requested:
        return int(requested)
    device = mm.get_torch_device()
    if device.type == "cpu":
        return None
    per_frame = max(1, activation_bytes(branches, latent_hw))
    return max(1, min(int(frames), int(mm.get_free_memory(device) * 0.9 // per_frame)))


def model_dtype(choice: str, role: str = "unet") -> torch.dtype:
    """``auto``: fp32 on the CPU; on a GPU fp16/bf16 where ComfyUI would use them (fp32 for the VAE unless
    ComfyUI picks otherwise)."""
    if choice in _NAMED:
        return _NAMED[choice]
    device = mm.get_torch_device()
    if device.type == "cpu":
        return torch.float32
    if role == "vae":
        return mm.vae_dtype(device)
    if mm.should_use_fp16(device):
        return torch.float16
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float32


@dataclass
class ImageHandle:
    """What travels on a VB_IMAGE_MODEL socket: the core bundle and one ModelPatcher per heavy module."""
    model: ImageModel
    unet: object = None
    vae: object = None
    text: object = None

    def __post_init__(self):
        self.unet = self.unet or patcher(self.model.unet, "unet")
        self.vae = self.vae or patcher(self.model.vae, "vae")
        self.text = self.text or patcher(self.model.text_encoder, "text")


@dataclass
class VideoHandle:
    """What travels on a VB_VIDEO_MODEL socket. ``image`` is the AnimateDiff base model (its text encoder and VAE
    are shared); ZeroScope carries its own text encoder and VAE."""
    model: VideoModel
    image: Optional[ImageHandle] = None
    unet: object = None
    text: object = None
    vae: object = None
    context: Optional[ContextWindows] = None      # set by VBContextWindows: every call of this model is windowed
    sequential_branches: bool = False             # set by VBContextWindows: guidance branches one after the other

    def __post_init__(self):
        self.unet = self.unet or patcher(self.model.unet, "unet")
        if self.image is not None and self.model.text_encoder is self.image.model.text_encoder:
            self.text = self.image.text
        else:
            self.text = self.text or patcher(self.model.text_encoder, "text")
        if self.model.vae is not None:
            self.vae = self.vae or patcher(self.model.vae, "vae")


@dataclass
class ControlNetHandle:
    model: torch.nn.Module
    source: str
    patcher: object = field(default=None)

    def __post_init__(self):
        self.patcher = self.patcher or patcher(self.model, "unet")


def unique_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each shared tensor counted once."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _motion_key(path: str, dtype) -> str:
    return "motion_" + hashlib.sha1(f"{os.path.abspath(path)}|{dtype}".encode()).hexdigest()[:12]


def shared_animatediff(image: ImageHandle, path: str, dtype) -> Optional[VideoModel]:
    """The AnimateDiff model already built from motion module ``path`` on this image model (see
    ``animatediff_handle``), or None."""
    return getattr(image.unet.model, "vb_video_models", {}).get(_motion_key(path, dtype))


def animatediff_handle(model: VideoModel, image: ImageHandle, path: str, dtype) -> VideoHandle:
    """The VB_VIDEO_MODEL of an AnimateDiff model built on ``image``. When its spatial modules are the image UNet's
    (``core.models.share_spatial_modules``: same dtype), the motion UNet joins the image model's ModelPatcher, so
    ComfyUI loads, moves and counts the shared weights once for both handles (two patchers over shared modules would
    each move them and disagree about where they are). A motion module built again on the same image model (the
    node re-run) is reused, not added twice."""
    unet = image.model.unet
    if model.unet.conv_in is not unet.conv_in:                     # cast copy (another dtype): its own patcher
        return VideoHandle(model, image=image)
    holder = image.unet.model
    models = holder.__dict__.setdefault("vb_video_models", {})
    key = _motion_key(path, dtype)
    if key not in models:
        model.unet.to(next(unet.parameters()).device)           # where the patcher has the shared weights now
        holder.add_module(key, model.unet)
        models[key] = model
        image.unet.size = unique_bytes(holder)
    return VideoHandle(model, image=image, unet=image.unet)


def video_denoiser(handle: VideoHandle, schedule: Optional[NoiseSchedule] = None):
    """The core denoiser of a VB_VIDEO_MODEL (on ``schedule``, default its own), on the context windows
    VBContextWindows set, if any."""
    return windowed(VideoDenoiser(handle.model.unet, schedule or handle.model.schedule,
                                  sequential_branches=handle.sequential_branches), handle.context)


ACTIVATION_FACTOR = {"motion": 1.0, "unet3d": 1.3}
"""Activation memory of one video-model call per latent row, relative to an SD1.5 call on as many rows (the unit of
``activation_bytes``), measured by benchmarks/activation_bench.py with full-size random weights (one CFG-batched call
of 8 frames): AnimateDiff v2 1.00 (its peak is the spatial layers' feed-forward, which it shares with SD1.5),
ZeroScope 1.28 at 256x256 and 1.27 at 384x384 (temporal convolutions and attention on every level); rounded up."""


def video_rows(handle: VideoHandle, frames: int, branches: int = 2) -> int:
    """SD1.5-equivalent latent rows (for ``activation_bytes``) of one call of this video model on a ``frames`` clip
    with ``branches`` guidance branches: the window length on context windows, one branch at a time with
    ``sequential_branches``, times the family's ``ACTIVATION_FACTOR``."""
    if handle.context is not None:
        frames = min(frames, handle.context.context_length)
    return math.ceil((1 if handle.sequential_branches else branches) * frames * ACTIVATION_FACTOR[handle.model.kind])


# ------------------------------------------------------------------ progress, preview, Cancel
class Progress:
    """One ComfyUI progress bar over every phase of a node; builds core ``Callbacks`` with previews and Cancel."""

    def __init__(self, total: int, preview_every: int = 1):
        self.total, self.done, self.every = max(1, int(total)), 0, preview_every
        self.bar = comfy.utils.ProgressBar(self.total)
        self.previewer = latent_preview.get_previewer(mm.get_torch_device(), comfy.latent_formats.SD15())

    def _step(self, x0: Optional[torch.Tensor]) -> None:
        self.done += 1
        preview = None
        if x0 is not None and self.previewer is not None and self.done % self.every == 0:
            frame = x0[:, :, 0] if x0.dim() == 5 else x0[:1]               # one frame [1, 4, h, w], scaled
            preview = self.previewer.decode_latent_to_preview_image("JPEG", frame[:, :4])
        self.bar.update_absolute(min(self.done, self.total), self.total, preview)

    @property
    def callbacks(self) -> Callbacks:
        return Callbacks(progress=self._step, interrupt=mm.throw_exception_if_processing_interrupted)


def progress_text(text: str) -> None:
    """Show ``text`` under the running node in the ComfyUI frontend (ComfyUI's progress text; a no-op where the
    server or the executing context is missing: in-process tests, older ComfyUI)."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer

        ctx = get_executing_context()
        if ctx is not None and getattr(PromptServer, "instance", None) is not None:
            PromptServer.instance.send_progress_text(text, ctx.node_id)
    except (ImportError, AttributeError):
        pass


# ------------------------------------------------------------------ IMAGE / MASK / LATENT
def image_to_video(images: torch.Tensor, name: str, device) -> torch.Tensor:
    """ComfyUI IMAGE ``[F, H, W, C]`` 0..1 -> core pixels ``[1, 3, F, H, W]`` -1..1 (alpha dropped)."""
    if images.dim() != 4:
        raise ValueError(f"{name}: expected an IMAGE batch [frames, height, width, channels], got shape "
                         f"{tuple(images.shape)}")
    check_frames(name, images.shape[0])
    check_size(name, images.shape[1], images.shape[2])
    check_finite(name, images)
    x = images[..., :3].to(device, torch.float32) * 2 - 1
    return rearrange(x, "f h w c -> 1 c f h w")


def video_to_image(pixels: torch.Tensor) -> torch.Tensor:
    """Core pixels ``[1, 3, F, H, W]`` -1..1 -> ComfyUI IMAGE ``[F, H, W, 3]`` 0..1 on the intermediate device."""
    x = (pixels.float() / 2 + 0.5).clamp(0, 1)
    return rearrange(x, "1 c f h w -> f h w c").to(mm.intermediate_device())


def hints_to_core(images: torch.Tensor, name: str, frames: int, size) -> torch.Tensor:
    """ControlNet hint IMAGE ``[F or 1, H, W, C]`` 0..1 -> ``[F, 3, H, W]`` 0..1, checked against the video."""
    if images.dim() != 4:
        raise ValueError(f"{name}: expected an IMAGE batch, got shape {tuple(images.shape)}")
    check_frames(name, images.shape[0], frames)
    if tuple(images.shape[1:3]) != tuple(size):
        raise ValueError(f"{name}: frames are {images.shape[2]}x{images.shape[1]} but the video is "
                         f"{size[1]}x{size[0]}; resize them to the same size")
    check_finite(name, images)
    return images[..., :3].movedim(-1, 1).float().expand(frames, -1, -1, -1)


def mask_to_core(mask: torch.Tensor, name: str, frames: int, size) -> torch.Tensor:
    """ComfyUI MASK ``[F, H, W]`` or ``[H, W]`` (1 = repaint) -> ``[F, H, W]`` float, checked against the video."""
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3:
        raise ValueError(f"{name}: expected a MASK [frames, height, width], got shape {tuple(mask.shape)}")
    check_frames(name, mask.shape[0], frames)
    if tuple(mask.shape[1:]) != tuple(size):
        raise ValueError(f"{name}: mask is {mask.shape[2]}x{mask.shape[1]} but the video is {size[1]}x{size[0]}")
    check_finite(name, mask)
    return mask.float().expand(frames, -1, -1)


LATENT_KEYS = ("vb_timestep", "vb_schedule", "vb_grid")


def to_latent(z: torch.Tensor, scale: float, timestep=None, schedule: Optional[NoiseSchedule] = None,
              grid=None) -> dict:
    """Core latent ``[1, 4, F, h, w]`` (scaled) -> ComfyUI LATENT ``{"samples": [F, 4, h, w]}`` UNSCALED, so core
    VAEDecode and other packs read it. A noisy latent also carries ``vb_timestep`` (the level it sits at),
    ``vb_schedule`` (a description of the schedule) and ``vb_grid`` (the sampler grid it was inverted for)."""
    out = {"samples": rearrange(z.float() / scale, "1 c f h w -> f c h w").to(mm.intermediate_device())}
    if timestep is not None:
        out.update(vb_timestep=int(timestep), vb_schedule=schedule.describe(), vb_grid=[int(t) for t in grid])
    return out


def from_latent(latent: dict, name: str, scale: float, device) -> torch.Tensor:
    """ComfyUI LATENT (unscaled ``[F, 4, h, w]``) -> core ``[1, 4, F, h, w]`` scaled, float32, on ``device``."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError(f"{name}: expected a LATENT, got {type(latent).__name__}")
    s = latent["samples"]
    if s.dim() == 5:                                                    # [B, C, F, h, w] from video packs
        if s.shape[0] != 1:
            raise ValueError(f"{name}: expected one video, got a batch of {s.shape[0]}")
        s = rearrange(s, "1 c f h w -> f c h w")
    if s.dim() != 4 or s.shape[1] != 4:
        raise ValueError(f"{name}: expected SD latents [frames, 4, h, w], got shape {tuple(s.shape)}")
    check_frames(name, s.shape[0])
    if s.numel() == 0:
        raise ValueError(f"{name}: the latent is empty (shape {tuple(s.shape)}); connect a latent with frames")
    check_finite(name, s)
    return rearrange(s.to(device, torch.float32) * scale, "f c h w -> 1 c f h w")


def is_noisy(latent: dict) -> bool:
    return isinstance(latent, dict) and latent.get("vb_timestep") is not None


def tokenizer_dir() -> str:
    """ComfyUI's own SD1 CLIP tokenizer files (``comfy/sd1_tokenizer``): every install has them."""
    return os.path.join(list(comfy.__path__)[0], "sd1_tokenizer")          # comfy is a namespace package


def encode(handle, prompts) -> torch.Tensor:
    """Encode prompts with the text encoder of an Image/VideoHandle -> ``[N, 77, D]`` float32 on the device."""
    from ..core.models import encode_prompts

    device = load(handle.text)
    return encode_prompts(handle.model.text_encoder, handle.model.tokenizer, list(prompts), device=device)
